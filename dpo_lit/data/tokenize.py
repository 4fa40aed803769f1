"""Canonical examples → token ids, such that ``prompt_ids + completion_ids`` is what the model sees.

Rules (each one a trap TRL-style pipelines have fallen into):

- A plain-text prompt is tokenized *with* special tokens (a BOS if the tokenizer adds one). A
  chat-rendered prompt already holds the specials as text, so it is tokenized *without* them;
  a doubled BOS at the start is collapsed all the same.
- A completion is tokenized without special tokens and closed by exactly one EOS: plain text gets
  one appended unless it already ends with it; a chat rendering (``Hi!<|im_end|>\\n``) is cut
  after its last EOS (dropping the ``\\n``), or gets one appended if it holds none.
- ``max_prompt_length`` truncates the prompt first (``keep_end`` keeps the end, nearest the
  answer, and a leading BOS the tokenizer adds; ``keep_start`` keeps the start); then
  ``max_length`` bounds prompt + completion by cutting the completion's end. A cut completion
  loses its EOS and none is re-appended: the model never wrote an end there. A completion cut to
  zero tokens is dropped and counted in the :class:`~dpo_lit.data.errors.DataReport`.
- Examples that carry token ids (the ``tokenized`` format: on-policy samples) are trained on as
  given: nothing is re-tokenised and no EOS is appended (a sampled completion that was cut keeps
  none; a finished one already ends with it). Their ids must lie inside the tokenizer's
  vocabulary; the two truncations and the zero-token drop apply as above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from dpo_lit.data.errors import DataError, DataReport
from dpo_lit.data.formats import Example, PairedExample, Text, TokenIds
from dpo_lit.errors import ConfigError

TruncationMode = Literal["keep_end", "keep_start"]
TokenizedExample = dict[str, Any]


@dataclass
class Encoded:
    """An example as token ids before truncation; its completions end as they will be trained."""

    prompt: list[int]
    completions: list[list[int]]
    label: bool | None
    source: str


@dataclass
class Rendered:
    """An example as text: the prompt, its completions (chosen, rejected or the one), how made."""

    prompt: str
    completions: list[str]
    chat: bool
    label: bool | None
    source: str


def render_messages(
    prompt: list[dict[str, str]],
    completion: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    field: str,
    source: str,
) -> tuple[str, str]:
    """Prompt text (with the generation prompt) and the completion text that follows it."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError(
            source,
            f"field '{field}': the chat template's rendering of prompt + {field} does not start with "
            "its rendering of the prompt with add_generation_prompt=True",
        )
    return prompt_text, full_text[len(prompt_text) :]


def render(example: Example, tokenizer: PreTrainedTokenizerBase) -> Rendered:
    """Render message lists with the chat template; strings pass through."""
    paired = isinstance(example, PairedExample)
    names = ("chosen", "rejected") if paired else ("completion",)
    completions: list[Text] = [getattr(example, name) for name in names]
    label = None if paired else example.label
    if isinstance(example.prompt, str):
        return Rendered(example.prompt, list(completions), False, label, example.source)
    texts = [
        render_messages(example.prompt, c, tokenizer, n, example.source) for n, c in zip(names, completions)
    ]
    return Rendered(texts[0][0], [t[1] for t in texts], True, label, example.source)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"]


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], special: bool) -> list[list[int]]:
    """Batch-encode prompt texts; a doubled leading BOS (a template's BOS plus the tokenizer's) is
    collapsed to one."""
    bos = tokenizer.bos_token_id
    ids = _encode(tokenizer, list(texts), special)
    return [row[1:] if bos is not None and row[:2] == [bos, bos] else row for row in ids]


def close_completion(ids: list[int], chat: bool, eos: int) -> list[int]:
    """End a completion with exactly one EOS (see the module docstring)."""
    if chat and eos in ids:
        return ids[: len(ids) - ids[::-1].index(eos)]
    return ids if ids and ids[-1] == eos else [*ids, eos]


def truncate_prompt(
    ids: list[int], max_prompt_length: int | None, mode: TruncationMode, bos: int | None
) -> list[int]:
    """Cut the prompt to ``max_prompt_length``; ``keep_end`` keeps a leading ``bos`` when given."""
    if max_prompt_length is None or len(ids) <= max_prompt_length:
        return ids
    if mode == "keep_start":
        return ids[:max_prompt_length]
    if bos is not None and ids[0] == bos and max_prompt_length > 1:
        return [bos, *ids[len(ids) - max_prompt_length + 1 :]]
    return ids[len(ids) - max_prompt_length :]


def added_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a text by itself (a BOS, or nothing)."""
    with_specials = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    cut = len(with_specials) - len(without)
    return list(with_specials[:cut]) if cut > 0 and with_specials[cut:] == without else []


def _added_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id if the tokenizer prepends it itself, else ``None``."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and added_prefix(tokenizer)[:1] == [bos] else None


def _render_all(
    examples: Sequence[tuple[int, Example]], tokenizer: PreTrainedTokenizerBase, report: DataReport
) -> list[tuple[int, Rendered]]:
    rendered = []
    for position, example in examples:
        if not isinstance(example.prompt, str) and tokenizer.chat_template is None:
            raise DataError(
                example.source, f"message lists need a chat template; {tokenizer.name_or_path} has none"
            )
        try:
            rendered.append((position, render(example, tokenizer)))
        except DataError as error:
            report.bad_record(error)
    return rendered


def _encode_prompts(tokenizer: PreTrainedTokenizerBase, rendered: list[Rendered]) -> list[list[int]]:
    """Batch-encode prompts: plain ones with special tokens, chat-rendered ones without."""
    prompts: list[list[int]] = [[] for _ in rendered]
    for chat in (False, True):
        positions = [i for i, r in enumerate(rendered) if r.chat == chat]
        for i, ids in zip(positions, encode_texts(tokenizer, [rendered[i].prompt for i in positions], not chat)):
            prompts[i] = ids
    return prompts


def _encode_texts(
    examples: Sequence[tuple[int, Example]], tokenizer: PreTrainedTokenizerBase, eos: int, report: DataReport
) -> dict[int, Encoded]:
    """Render, batch-encode and close the completions of text examples, keyed by position."""
    rendered = _render_all(examples, tokenizer, report)
    prompts = _encode_prompts(tokenizer, [r for _, r in rendered])
    flat = _encode(tokenizer, [c for _, r in rendered for c in r.completions], False)
    encoded, k = {}, 0
    for (position, r), prompt in zip(rendered, prompts):
        n = len(r.completions)
        encoded[position] = Encoded(
            prompt, [close_completion(ids, r.chat, eos) for ids in flat[k : k + n]], r.label, r.source
        )
        k += n
    return encoded


def _given_ids(example: Example, ids: TokenIds, vocab_size: int, report: DataReport) -> Encoded | None:
    """The token ids an example carries, as they are, once checked against the vocabulary."""
    paired = isinstance(example, PairedExample)
    names = ("chosen_ids", "rejected_ids") if paired else ("completion_ids",)
    for name in ("prompt_ids", *names):
        outside = [t for t in ids[name] if t >= vocab_size]
        if outside:
            reason = (
                f"field '{name}': token id {outside[0]} is outside the tokenizer's vocabulary of {vocab_size}"
            )
            report.bad_record(DataError(example.source, reason))
            return None
    label = None if paired else example.label
    return Encoded(list(ids["prompt_ids"]), [list(ids[n]) for n in names], label, example.source)


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 1024,
    max_prompt_length: int | None = 512,
    truncation_mode: TruncationMode = "keep_end",
    report: DataReport | None = None,
) -> list[TokenizedExample]:
    """Tokenize and truncate examples in batches.

    Returns:
        Dicts with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (paired) or ``prompt_ids``,
        ``completion_ids``, ``label`` (unpaired), plus ``source``. Every completion has at least
        one token; examples whose completion would have none are dropped and counted in ``report``.
    """
    report = report if report is not None else DataReport()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"model.model_name: tokenizer {tokenizer.name_or_path} has no EOS token")
    texts = [(i, e) for i, e in enumerate(examples) if e.token_ids is None]
    encoded = _encode_texts(texts, tokenizer, eos, report)
    for i, e in enumerate(examples):
        if e.token_ids is not None and (given := _given_ids(e, e.token_ids, len(tokenizer), report)):
            encoded[i] = given
    bos, out = _added_bos(tokenizer), []
    for i in sorted(encoded):
        e = encoded[i]
        prompt = truncate_prompt(e.prompt, max_prompt_length, truncation_mode, bos)
        budget = max_length - len(prompt)
        completions = [ids[: max(budget, 0)] for ids in e.completions]
        if not all(completions):
            report.drop_truncated(e.source)
            continue
        if len(prompt) < len(e.prompt) or any(len(c) < len(ids) for c, ids in zip(completions, e.completions)):
            report.truncated += 1
        example: TokenizedExample = {"prompt_ids": prompt}
        if e.label is None:
            example["chosen_ids"], example["rejected_ids"] = completions
        else:
            example["completion_ids"], example["label"] = completions[0], e.label
        example["source"] = e.source
        out.append(example)
    return out


class TokenizedDataset(Dataset):
    """A list of tokenized examples whose items also carry their ``index`` in the list.

    The index is how precomputed reference log-probs are looked up for a batch.
    """

    def __init__(self, examples: list[TokenizedExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return {**self.examples[index], "index": index}

    @property
    def paired(self) -> bool:
        """Whether the examples are preference pairs (``chosen_ids``/``rejected_ids``)."""
        return not self.examples or "chosen_ids" in self.examples[0]
