"""Prompts for sampling: read from a file, validated, and encoded as the data pipeline encodes them.

A prompt is a string or a list of ``{"role", "content"}`` messages. :func:`read_prompts` reads
one per line of a ``.txt`` file, or the ``prompt`` field of every record of any file
:func:`~dpo_lit.data.io.read_records` reads; :func:`encode_prompts` renders them with the chat
template when the tokenizer has one, exactly as :mod:`~dpo_lit.data.tokenize` renders prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from dpo_lit.data.formats import Messages, text_field
from dpo_lit.data.io import read_records
from dpo_lit.data.tokenize import encode_texts
from dpo_lit.errors import ConfigError, DataError

Prompt = str | Messages


def prompt_text(prompt: Prompt) -> str:
    """What a reward sees of a prompt: the string, or the last message's content."""
    return prompt if isinstance(prompt, str) else str(prompt[-1]["content"])


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a file: one per line of a ``.txt`` file (blank lines skipped), or the ``prompt``
    field (a string or a message list) of every record of a ``.jsonl``/``.json``/``.csv``/``.parquet``
    file (preference data included).

    Raises:
        DataError: ``path:line: field 'prompt': ...`` for a missing, empty or ill-typed prompt, or
            ``path: file not found``.
    """
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError(str(path), "file not found")
        lines = path.read_text(encoding="utf-8").splitlines()
        return [line for line in lines if line.strip()]
    prompts = []
    for record, location in read_records(str(path)):
        if "prompt" not in record:
            raise DataError(location, "field 'prompt': missing")
        prompts.append(text_field(record["prompt"], "prompt", location))
    return prompts


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], chat: bool | None = None
) -> list[list[int]]:
    """Token ids of prompts, rendered as the data pipeline renders them.

    With a chat template (and ``chat`` not ``False``) each prompt (a string becomes one user
    message) is rendered with ``add_generation_prompt=True`` and tokenized without special tokens;
    otherwise plain strings are tokenized with special tokens. A doubled leading BOS is collapsed.

    Args:
        tokenizer: The policy's tokenizer.
        prompts: Strings or lists of ``{"role", "content"}`` messages.
        chat: ``None``: use the chat template when the tokenizer has one; ``True``: require it;
            ``False``: plain text (message lists are refused).
    """
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat and not has_template:
        raise ConfigError(f"chat: true needs a chat template; {tokenizer.name_or_path} has none")
    use_chat = has_template and chat is not False
    if use_chat:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}] if isinstance(p, str) else list(p),
                add_generation_prompt=True,
                tokenize=False,
            )
            for p in prompts
        ]
    else:
        if any(not isinstance(p, str) for p in prompts):
            raise ConfigError("message-list prompts need a chat template (and chat not false)")
        texts = list(prompts)
    return encode_texts(tokenizer, texts, special=not use_chat)
