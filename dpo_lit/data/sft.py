"""Supervised fine-tuning data: demonstrations → prompt and completion ids → batches with labels.

=====================  =========================================================  ==================
format                 record                                                     loss on
=====================  =========================================================  ==================
``text``               ``text_field`` (default ``text``): a string                every token
``prompt_completion``  ``prompt``, ``completion``: strings or message lists;      the completion
                       a ``label`` field (KTO's unpaired data) must be true
``messages``           ``messages``: a conversation ending in an assistant turn   that last turn
``standard``, ...      preference pairs in any format of                          the chosen
                       :mod:`~dpo_lit.data.formats` (HH-RLHF's implicit-prompt    completion
                       transcripts: the prompt is the shared prefix)
=====================  =========================================================  ==================

``auto`` detects the format per file from its first record's keys, in the order of the table.
Every record becomes an :class:`~dpo_lit.data.formats.UnpairedExample` (label True) and goes
through :func:`~dpo_lit.data.tokenize.tokenize_examples`, so chat templates, BOS, truncation and
the closing EOS follow the same rules as preference data; a plain text is a completion after an
empty prompt (just the BOS, if the tokenizer adds one). Bad records raise (or, with
``on_bad_record: skip``, count) :class:`~dpo_lit.data.errors.DataError` ``path:line: field ...``.

A batch of B examples (T the longest row): ``input_ids`` and ``attention_mask`` (B, T) long,
right-padded; ``labels`` (B, T) long, the token id where the loss is taken and -100 elsewhere
(unshifted, as Hugging Face causal LMs take them).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedTokenizerBase

from dpo_lit.data import formats
from dpo_lit.data.collate import pad_rows
from dpo_lit.data.datamodule import TokenizedDataModule
from dpo_lit.data.errors import DataError, DataReport, OnBadRecord, describe
from dpo_lit.data.formats import Record, UnpairedExample
from dpo_lit.data.io import DataSource, read_records
from dpo_lit.data.load import shuffled, split_examples
from dpo_lit.data.tokenize import TokenizedDataset, TokenizedExample, tokenize_examples
from dpo_lit.errors import ConfigError

SFTFormat = Literal[
    "auto", "text", "prompt_completion", "messages",
    "standard", "conversational", "implicit", "openai", "tokenized",
]  # fmt: skip
IGNORE_INDEX = -100


def detect_sft_format(record: Record, text_field: str, source: str) -> SFTFormat:
    """The format of a record, from its keys (see the module docstring)."""
    keys = set(record)
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "messages" in keys:
        return "messages"
    if text_field in keys:
        return "text"
    try:
        return formats.detect_format(record, source)
    except DataError:
        raise DataError(
            source,
            f"cannot detect the SFT data format from the keys {sorted(keys)}; expected '{text_field}' "
            "(plain text), messages, prompt/completion, or preference pairs (prompt/chosen/rejected, "
            "chosen/rejected, ...)",
        ) from None


def parse_text(record: Record, source: str, text_field: str) -> UnpairedExample:
    """A plain text, trained on whole: the completion of an empty prompt."""
    if text_field not in record:
        raise DataError(source, f"field '{text_field}': missing")
    text = record[text_field]
    if not isinstance(text, str) or not text.strip():
        raise DataError(source, f"field '{text_field}': expected a non-empty string, got {describe(text)}")
    return UnpairedExample("", text, True, source)


def parse_messages(record: Record, source: str) -> UnpairedExample:
    """A conversation: the last (assistant) turn is the completion, the turns before it the prompt."""
    if "messages" not in record:
        raise DataError(source, "field 'messages': missing")
    messages = record["messages"]
    if not isinstance(messages, list):
        reason = f"field 'messages': expected a non-empty list of messages, got {describe(messages)}"
        raise DataError(source, reason)
    messages = formats.text_field(messages, "messages", source)
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise DataError(
            source,
            f"field 'messages[{last}].role': the last message is the one trained on and must be the "
            f"assistant's, got {messages[last]['role']!r}",
        )
    if last == 0:
        raise DataError(source, "field 'messages': no message before the assistant turn to train on")
    if not messages[last]["content"].strip():
        reason = f"field 'messages[{last}].content': expected a non-empty string, got an empty string"
        raise DataError(source, reason)
    return UnpairedExample(messages[:last], messages[last:], True, source)


def parse_prompt_completion(record: Record, source: str, marker: str) -> UnpairedExample:
    """``prompt``/``completion`` strings or message lists; an undesirable completion is refused."""
    example = formats.parse_unpaired({"label": True, **record}, source, marker)
    if not example.label:
        raise DataError(
            source,
            "field 'label': false (an undesirable completion); SFT trains on every completion it reads: "
            "keep only the desirable ones",
        )
    return example


def parse_sft_record(
    record: Record,
    fmt: SFTFormat,
    source: str,
    text_field: str = "text",
    assistant_marker: str = "\n\nAssistant:",
) -> UnpairedExample:
    """One record as the completion to train on and its prompt (``fmt`` must not be ``"auto"``).

    Raises:
        DataError: a missing field, a wrong type or an empty text, naming the field.
    """
    if fmt == "text":
        return parse_text(record, source, text_field)
    if fmt == "messages":
        return parse_messages(record, source)
    if fmt == "prompt_completion":
        return parse_prompt_completion(record, source, assistant_marker)
    pair = formats.parse_record(record, fmt, source, assistant_marker)
    return formats.as_unpaired(pair)[0]  # the chosen completion


def read_sft_examples(
    sources: Sequence[str],
    format: SFTFormat = "auto",
    text_field: str = "text",
    report: DataReport | None = None,
    assistant_marker: str = "\n\nAssistant:",
    extra_roles: Sequence[str] = (),
) -> list[UnpairedExample]:
    """Examples of every local file in order; the format is detected per file; message roles
    beyond system, user, assistant, tool and ``extra_roles`` are bad records."""
    report = report if report is not None else DataReport()
    examples = []
    for source in sources:
        fmt = format
        for record, location in read_records(source, report=report):
            if fmt == "auto":
                fmt = detect_sft_format(record, text_field, location)
            report.formats.setdefault(source, fmt)
            try:
                example = parse_sft_record(record, fmt, location, text_field, assistant_marker)
                examples.append(formats.check_roles(example, extra_roles))
            except DataError as error:
                report.bad_record(error)
    return examples


class SFTCollator:
    """Right-pad prompt + completion rows; ``labels`` hold the completion tokens, -100 elsewhere. Picklable.

    Args:
        pad_token_id: The id padding fills with (masked out; any id works).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        prompts = [e["prompt_ids"] for e in examples]
        input_ids, attention_mask, completion_mask = pad_rows(
            [p + e["completion_ids"] for p, e in zip(prompts, examples)], self.pad_token_id,
            first_scored=[len(p) for p in prompts],
        )  # (B, T) each
        labels = input_ids.masked_fill(~completion_mask, IGNORE_INDEX)  # (B, T)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class SFTDataModule(TokenizedDataModule):
    """Demonstrations for supervised fine-tuning, tokenized in ``setup()``.

    Args:
        tokenizer_name: Tokenizer to load with :func:`dpo_lit.models.load_tokenizer` (linked from
            the model's name by the CLI).
        train_files: Training data files (``.jsonl``, ``.json``, ``.csv``, optionally ``.gz``, or
            ``.parquet``), relative to the current directory.
        val_files: Validation files; without them ``val_fraction`` of the training data is held out.
        val_fraction: Fraction held out for validation when no validation files are given (0: none).
        seed: Seed of the deterministic shuffle, validation split and ``max_examples`` sample.
        format: Data format (:mod:`dpo_lit.data.sft`); ``auto`` detects it per file from the first
            record's keys.
        text_field: The field holding plain text (``text`` format).
        max_length: Bound on prompt + completion tokens; completions (and texts) are cut at the end.
        max_prompt_length: Bound on prompt tokens, applied first, keeping the prompt's end
            (``None``: only ``max_length``).
        batch_size: Training examples per batch.
        eval_batch_size: Examples per validation batch (``None``: ``batch_size``).
        num_workers: DataLoader worker processes.
        max_examples: Keep at most this many examples per split (after the shuffle), for short runs.
        on_bad_record: ``error`` stops at the first bad record, naming file, line and field;
            ``skip`` counts bad records and reports them once setup ends.
        assistant_marker: Where implicit-prompt transcripts' prompts end (HH-RLHF's marker).
        extra_roles: Message roles to accept beside system, user, assistant and tool.
    """

    def __init__(
        self,
        tokenizer_name: str,
        train_files: list[DataSource],
        val_files: list[DataSource] | None = None,
        val_fraction: float = 0.05,
        seed: int = 0,
        format: SFTFormat = "auto",
        text_field: str = "text",
        max_length: int = 1024,
        max_prompt_length: int | None = 512,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_examples: int | None = None,
        on_bad_record: Literal["error", "skip"] = "error",
        assistant_marker: str = "\n\nAssistant:",
        extra_roles: list[str] | None = None,
    ) -> None:
        super().__init__()
        if not train_files:
            raise ConfigError("data.train_files: SFTDataModule needs at least one training file")
        if max_prompt_length is not None and max_prompt_length >= max_length:
            raise ConfigError(
                f"data.max_prompt_length: max_prompt_length ({max_prompt_length}) must be below max_length "
                f"({max_length})"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer_name
        self.train_files, self.val_files = list(train_files), list(val_files or [])
        self.val_fraction, self.seed = val_fraction, seed
        self.format: SFTFormat = format
        self.text_field = text_field
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.max_examples = num_workers, max_examples
        self.on_bad_record: OnBadRecord = on_bad_record
        self.assistant_marker, self.extra_roles = assistant_marker, list(extra_roles or [])
        self.train_dataset: TokenizedDataset | None = None
        self.val_dataset: TokenizedDataset | None = None

    @cached_property
    def collator(self) -> SFTCollator:
        return SFTCollator(self.tokenizer.pad_token_id)

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer named by ``tokenizer_name`` (loaded on first use)."""
        from dpo_lit.models import load_tokenizer

        return load_tokenizer(self.tokenizer_name)

    def _read(self, files: list[str], report: DataReport) -> list[UnpairedExample]:
        return read_sft_examples(files, self.format, self.text_field, report, self.assistant_marker, self.extra_roles)

    def _tokenize(self, examples: list[UnpairedExample], report: DataReport) -> TokenizedDataset:
        examples = examples[: self.max_examples] if self.max_examples is not None else examples
        tokenized = tokenize_examples(
            examples, self.tokenizer, self.max_length, self.max_prompt_length, report=report
        )
        return TokenizedDataset(tokenized)

    def setup(self, stage: str | None = None) -> None:
        """Read, split, cap and tokenize both splits once; then warn what was skipped or dropped."""
        if self.train_dataset is not None:
            return
        report = DataReport(self.on_bad_record)
        train = self._read(self.train_files, report)
        if self.val_files:
            train, val = shuffled(train, self.seed), shuffled(self._read(self.val_files, report), self.seed)
            held_out = "from " + ", ".join(self.val_files)
        else:
            train, val = split_examples(train, self.val_fraction, self.seed)
            held_out = f"{self.val_fraction:g} of the training records"
        train_dataset, val_dataset = self._tokenize(train, report), self._tokenize(val, report)
        rank_zero_info(
            f"data: {len(train_dataset)} train and {len(val_dataset)} validation SFT examples from "
            f"{', '.join(self.train_files)} (validation: {held_out}); {report.summary()}"
        )
        report.warn(self.max_length, self.max_prompt_length)
        if not train_dataset:
            reason = "no training examples left after skipping and dropping"
            raise DataError(", ".join(self.train_files), reason)
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
