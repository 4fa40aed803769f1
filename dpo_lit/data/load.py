"""Files → canonical examples → tokenized examples, without Lightning.

:func:`load_examples` is the whole pipeline in one call; :class:`PreferenceDataModule` uses its
parts so that it can split and cap the examples before tokenizing them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from transformers import PreTrainedTokenizerBase

from dpo_lit.data.errors import DataError, DataReport, OnBadRecord
from dpo_lit.data.formats import Example, Format, as_unpaired, check_roles, detect_format, parse_record
from dpo_lit.data.io import read_records
from dpo_lit.data.tokenize import TokenizedExample, TruncationMode, tokenize_examples
from dpo_lit.errors import ConfigError

Mode = Literal["paired", "unpaired"]
UNPAIRED_IN_PAIRED_MODE = (
    "unpaired data (prompt/completion/label) cannot train a paired loss; "
    "use `mode: unpaired` in the data config with KTOLoss"
)


def read_examples(
    sources: Sequence[str],
    format: Format = "auto",
    mode: Mode = "paired",
    report: DataReport | None = None,
    assistant_marker: str = "\n\nAssistant:",
    extra_roles: Sequence[str] = (),
) -> list[Example]:
    """Canonical examples of every source in order; the format is detected per source.

    Args:
        sources: Local files (``.jsonl``, ``.json``, ``.csv``, optionally ``.gz``, ``.parquet``) or
            Hub splits (``hub:NAME?split=...``).
        format: ``"auto"`` detects each file's format from its first record's keys.
        mode: ``"paired"`` refuses unpaired data; ``"unpaired"`` accepts both (pairs are unpaired
            later, by :func:`~dpo_lit.data.formats.as_unpaired`).
        report: Raises or counts bad records (a fresh one raises).
        assistant_marker: Where implicit-prompt transcripts' prompts end.
        extra_roles: Message roles accepted beside system, user, assistant and tool.
    """
    report = report if report is not None else DataReport()
    examples: list[Example] = []
    for source in sources:
        fmt = format
        for record, location in read_records(source, report):
            if fmt == "auto":
                fmt = detect_format(record, location)
            report.formats.setdefault(source, fmt)
            if fmt == "unpaired" and mode == "paired":
                raise DataError(source, UNPAIRED_IN_PAIRED_MODE)
            try:
                examples.append(check_roles(parse_record(record, fmt, location, assistant_marker), extra_roles))
            except DataError as error:
                report.bad_record(error)
    return examples


def split_examples(
    examples: Sequence[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Shuffle deterministically (``seed``) and hold out ``val_fraction`` (at least one, if > 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(order))) if val_fraction > 0 and len(order) > 1 else 0
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def shuffled(examples: Sequence[Example], seed: int) -> list[Example]:
    """A deterministic shuffle of ``examples`` (so that a cap takes a random sample)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order]


def prepare(examples: Sequence[Example], mode: Mode, max_examples: int | None) -> list[Example]:
    """Unpair pairs in unpaired mode, then keep at most ``max_examples``.

    A pair becomes two adjacent examples with one prompt (chosen, then rejected); the collator
    never takes a KTO mismatched completion from a row with the same prompt
    (:func:`~dpo_lit.data.collate.mismatched_partners`), so this order is safe unshuffled.
    """
    if mode == "unpaired":
        examples = [u for e in examples for u in as_unpaired(e)]
    return list(examples[:max_examples] if max_examples is not None else examples)


def load_examples(
    sources: Sequence[str],
    tokenizer: PreTrainedTokenizerBase | str,
    format: Format = "auto",
    mode: Mode = "paired",
    max_length: int = 1024,
    max_prompt_length: int | None = 512,
    truncation_mode: TruncationMode = "keep_end",
    on_bad_record: OnBadRecord = "error",
    assistant_marker: str = "\n\nAssistant:",
    max_examples: int | None = None,
    extra_roles: Sequence[str] = (),
) -> list[TokenizedExample]:
    """Read, parse and tokenize every source in file order; skipped and dropped counts are warned.

    ``tokenizer`` is a tokenizer or a name for :func:`dpo_lit.models.load_tokenizer`; the other
    arguments are those of :class:`~dpo_lit.data.datamodule.PreferenceDataModule`.
    """
    if isinstance(tokenizer, str):
        from dpo_lit.models import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    report = DataReport(on_bad_record)
    examples = read_examples(sources, format, mode, report, assistant_marker, extra_roles)
    examples = prepare(examples, mode, max_examples)
    tokenized = tokenize_examples(examples, tokenizer, max_length, max_prompt_length, truncation_mode, report)
    report.warn(max_length, max_prompt_length)
    return tokenized
