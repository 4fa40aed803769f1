"""One small adapter per data format, each turning a raw record into a canonical example.

========================  =====================================================================
format                    record
========================  =====================================================================
``standard``              ``prompt``, ``chosen``, ``rejected``: strings
``conversational``        the same keys holding lists of ``{"role", "content"}`` messages
``implicit``              only ``chosen`` and ``rejected``: whole transcripts (strings, as in
                          Anthropic HH-RLHF, or message lists) that share the prompt as prefix
``openai``                ``input.messages``, ``preferred_output``, ``non_preferred_output``
``unpaired``              ``prompt``, ``completion`` (strings or messages), ``label`` (bool)
``tokenized``             ``prompt_ids``, ``chosen_ids``, ``rejected_ids``: lists of token ids,
                          trained on as given (on-policy pairs from :mod:`dpo_lit.pairs`); the
                          optional ``prompt``/``chosen``/``rejected`` texts are kept for reading
========================  =====================================================================

``auto`` detects the format per file from the first record's keys. Every check names the
field: a wrong record raises :class:`~dpo_lit.data.errors.DataError` ``path:line: field ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dpo_lit.data.errors import DataError, describe

Format = Literal["auto", "standard", "conversational", "implicit", "openai", "unpaired", "tokenized"]
Messages = list[dict[str, str]]
Text = str | Messages
Record = dict[str, Any]
TokenIds = dict[str, list[int]]
TOKEN_ID_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass
class PairedExample:
    """A preference pair: the prompt and two completions, strings or message lists alike."""

    prompt: Text
    chosen: Text
    rejected: Text
    source: str
    token_ids: TokenIds | None = None
    """``prompt_ids``/``chosen_ids``/``rejected_ids`` to train on as given (``tokenized`` format)."""


@dataclass
class UnpairedExample:
    """One completion labelled desirable (``True``) or undesirable (``False``), as KTO uses."""

    prompt: Text
    completion: Text
    label: bool
    source: str
    token_ids: TokenIds | None = None
    """``prompt_ids``/``completion_ids`` to train on as given (an unpaired ``tokenized`` pair)."""


Example = PairedExample | UnpairedExample


def detect_format(record: Record, source: str) -> Format:
    """The format of a record, from its keys (and whether ``chosen`` holds a string)."""
    keys = set(record)
    if set(TOKEN_ID_FIELDS) <= keys:
        return "tokenized"
    if {"input", "preferred_output", "non_preferred_output"} <= keys:
        return "openai"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "conversational" if isinstance(record["chosen"], list) else "standard"
    if {"chosen", "rejected"} <= keys:
        return "implicit"
    raise DataError(
        source,
        f"cannot detect the data format from the keys {sorted(keys)}; expected prompt/chosen/rejected, "
        "chosen/rejected, prompt/completion/label, input/preferred_output/non_preferred_output or "
        "prompt_ids/chosen_ids/rejected_ids",
    )


def _get(record: Record, key: str, source: str) -> Any:
    if key not in record:
        raise DataError(source, f"field '{key}': missing")
    return record[key]


def _string(value: Any, name: str, source: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise DataError(source, f"field '{name}': expected a non-empty string, got {describe(value)}")
    return value


def _messages(value: Any, name: str, source: str, completion: bool = False) -> Messages:
    """Validate a list of ``{"role", "content"}`` messages; completions need non-empty content
    and must end with the assistant's turn (what is trained on is the assistant's answer)."""
    if not isinstance(value, list) or not value:
        raise DataError(
            source, f"field '{name}': expected a non-empty list of messages, got {describe(value)}"
        )
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(
                source, f"field '{name}[{i}]': expected a message object, got {describe(message)}"
            )
        _string(_get_field(message, "role", f"{name}[{i}]", source), f"{name}[{i}].role", source)
        content = _get_field(message, "content", f"{name}[{i}]", source)
        _string(content, f"{name}[{i}].content", source, allow_empty=not completion)
    if completion and value[-1]["role"] != "assistant":
        raise DataError(
            source, f"field '{name}[{len(value) - 1}].role': a completion must end with an assistant turn, "
            f"not {value[-1]['role']!r}"
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


ROLES = ("system", "user", "assistant", "tool")


def check_roles(example: Example, extra_roles: Sequence[str] = ()) -> Example:
    """``example`` if every message's role is one of :data:`ROLES` or ``extra_roles`` (roles a
    chat template defines beyond those, e.g. ``ipython``); a DataError naming the field otherwise."""
    allowed = (*ROLES, *extra_roles)
    fields = ("prompt", "completion") if isinstance(example, UnpairedExample) else ("prompt", "chosen", "rejected")
    for name in fields:
        value = getattr(example, name)
        for i, message in enumerate(value if isinstance(value, list) else []):
            if message["role"] not in allowed:
                raise DataError(
                    example.source, f"field '{name}[{i}].role': unknown role {message['role']!r}; expected one of "
                    f"{', '.join(allowed)} (a chat template with more roles: list them in data.extra_roles)"
                )
    return example


def _get_field(message: Record, key: str, name: str, source: str) -> Any:
    if key not in message:
        raise DataError(source, f"field '{name}.{key}': missing")
    return message[key]


def text_field(value: Any, name: str, source: str, completion: bool = False) -> Text:
    """A string or a message list, whichever ``value`` is, validated (``DataError`` naming ``name``)."""
    if isinstance(value, list):
        return _messages(value, name, source, completion)
    return _string(value, name, source)


def _distinct(example: PairedExample) -> PairedExample:
    if example.chosen == example.rejected:
        raise DataError(example.source, "fields 'chosen' and 'rejected': identical completions")
    return example


def parse_standard(record: Record, source: str, marker: str) -> PairedExample:
    """``prompt``/``chosen``/``rejected`` strings."""
    prompt, chosen, rejected = (
        _string(_get(record, k, source), k, source) for k in ("prompt", "chosen", "rejected")
    )
    return _distinct(PairedExample(prompt, chosen, rejected, source))


def parse_conversational(record: Record, source: str, marker: str) -> PairedExample:
    """``prompt``/``chosen``/``rejected`` message lists."""
    prompt = _messages(_get(record, "prompt", source), "prompt", source)
    chosen = _messages(_get(record, "chosen", source), "chosen", source, completion=True)
    rejected = _messages(_get(record, "rejected", source), "rejected", source, completion=True)
    return _distinct(PairedExample(prompt, chosen, rejected, source))


def split_implicit_text(chosen: str, rejected: str, marker: str) -> tuple[str, str, str]:
    """Cut two transcripts after the last ``marker`` inside their common prefix.

    Without a marker in the common prefix, the prompt is the plain common prefix.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(marker, 0, n)
    n = cut + len(marker) if cut >= 0 else n
    return chosen[:n], chosen[n:], rejected[n:]


def split_implicit_messages(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """The shared leading messages up to the last turn where both continue with the assistant."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    while n > 0 and not (
        n < len(chosen) and n < len(rejected) and chosen[n]["role"] == rejected[n]["role"] == "assistant"
    ):
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def parse_implicit(record: Record, source: str, marker: str) -> PairedExample:
    """``chosen``/``rejected`` whole transcripts that share the prompt as their prefix."""
    chosen = text_field(_get(record, "chosen", source), "chosen", source, completion=True)
    rejected = text_field(_get(record, "rejected", source), "rejected", source, completion=True)
    if type(chosen) is not type(rejected):
        raise DataError(source, "fields 'chosen' and 'rejected': one is a string, the other a message list")
    _distinct(PairedExample("", chosen, rejected, source))
    if isinstance(chosen, str):
        prompt, chosen, rejected = split_implicit_text(chosen, rejected, marker)
        kind = "string"
    else:
        prompt, chosen, rejected = split_implicit_messages(chosen, rejected)
        kind = "list of messages"
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not value or (isinstance(value, str) and not value.strip()):
            raise DataError(source, f"field '{name}': empty {kind} after splitting off the shared prompt")
    return PairedExample(prompt, chosen, rejected, source)


def parse_openai(record: Record, source: str, marker: str) -> PairedExample:
    """OpenAI preference fine-tuning records: ``input.messages`` and two one-message outputs."""
    inputs = _get(record, "input", source)
    if not isinstance(inputs, dict):
        raise DataError(source, f"field 'input': expected an object with 'messages', got {describe(inputs)}")
    prompt = _messages(_get(inputs, "messages", source), "input.messages", source)
    chosen = _messages(_get(record, "preferred_output", source), "preferred_output", source, completion=True)
    rejected = _messages(
        _get(record, "non_preferred_output", source), "non_preferred_output", source, completion=True
    )
    return _distinct(PairedExample(prompt, chosen, rejected, source))


def _label(value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")  # CSV files hold strings
    raise DataError(source, f"field 'label': expected a boolean, got {describe(value)}")


def parse_unpaired(record: Record, source: str, marker: str) -> UnpairedExample:
    """``prompt``/``completion``/``label`` records for KTO."""
    prompt = text_field(_get(record, "prompt", source), "prompt", source)
    completion = text_field(_get(record, "completion", source), "completion", source, completion=True)
    if type(prompt) is not type(completion):
        raise DataError(source, "fields 'prompt' and 'completion': one is a string, the other a message list")
    return UnpairedExample(prompt, completion, _label(_get(record, "label", source), source), source)


def _token_ids(value: Any, name: str, source: str) -> list[int]:
    """A non-empty list of non-negative ints (the vocabulary bound is checked when tokenizing)."""
    if not isinstance(value, list) or not value:
        raise DataError(
            source, f"field '{name}': expected a non-empty list of token ids, got {describe(value)}"
        )
    for i, token in enumerate(value):
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise DataError(
                source, f"field '{name}[{i}]': expected a non-negative integer token id, got {token!r}"
            )
    return value


def parse_tokenized(record: Record, source: str, marker: str) -> PairedExample:
    """``prompt_ids``/``chosen_ids``/``rejected_ids`` lists of ints, with optional texts for reading."""
    ids = {name: _token_ids(_get(record, name, source), name, source) for name in TOKEN_ID_FIELDS}
    if ids["chosen_ids"] == ids["rejected_ids"]:
        raise DataError(source, "fields 'chosen_ids' and 'rejected_ids': identical completions")
    texts = []
    for name in ("prompt", "chosen", "rejected"):
        value = record.get(name, "")
        if not isinstance(value, str | list):
            raise DataError(
                source, f"field '{name}': expected a string or a list of messages, got {describe(value)}"
            )
        texts.append(value)
    return PairedExample(*texts, source, token_ids=ids)


PARSERS: dict[str, Callable[[Record, str, str], Example]] = {
    "standard": parse_standard,
    "conversational": parse_conversational,
    "implicit": parse_implicit,
    "openai": parse_openai,
    "unpaired": parse_unpaired,
    "tokenized": parse_tokenized,
}


def parse_record(
    record: Record, fmt: Format, source: str, assistant_marker: str = "\n\nAssistant:"
) -> Example:
    """Turn one raw record into a canonical example (``fmt`` must not be ``"auto"``).

    Raises:
        DataError: a missing field, a wrong type, an empty text, or identical completions.
    """
    return PARSERS[fmt](record, source, assistant_marker)


def as_unpaired(example: Example) -> list[UnpairedExample]:
    """Unpair a preference pair as TRL does (chosen labelled ``True``, rejected ``False``)."""
    if isinstance(example, UnpairedExample):
        return [example]
    ids = example.token_ids
    return [
        UnpairedExample(
            example.prompt,
            completion,
            label,
            example.source,
            None if ids is None else {"prompt_ids": ids["prompt_ids"], "completion_ids": ids[name]},
        )
        for completion, label, name in (
            (example.chosen, True, "chosen_ids"),
            (example.rejected, False, "rejected_ids"),
        )
    ]
