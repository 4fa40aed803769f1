"""``PreferenceDataModule``: preference data files or Hub datasets → collated batches.

Its typed, documented ``__init__`` is the ``data:`` section of the CLI; ``tokenizer_name`` is
linked from the model's name. See :mod:`dpo_lit.data.collate` for the batch contract.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler, Subset
from transformers import PreTrainedTokenizerBase

from dpo_lit.data.collate import PreferenceCollator
from dpo_lit.data.errors import DataError, DataReport, OnBadRecord
from dpo_lit.data.formats import Example, Format
from dpo_lit.data.io import DataSource
from dpo_lit.data.load import Mode, prepare, read_examples, shuffled, split_examples
from dpo_lit.data.tokenize import TokenizedDataset, TruncationMode, tokenize_examples
from dpo_lit.errors import ConfigError


class EpochShuffle(DistributedSampler):
    """A permutation of ``range(n)`` per epoch, drawn from a generator seeded with ``(seed, epoch)``,
    cut into global batches of ``batch_size`` x ``num_replicas`` examples; each rank takes its
    contiguous share of every global batch.

    The order depends on nothing else (not the global RNG, not what ran before, not the number of
    processes), so a resumed run sees the batches an uninterrupted one would, the batches a run
    will use are known before it starts (:meth:`TokenizedDataModule.train_indices`), and 2 processes
    with ``batch_size`` 4 train on the global batches 1 process with ``batch_size`` 8 does: the
    gradients DDP averages are those of the same 8 examples. (A last global batch that does not
    split evenly is padded with its own first examples, as ``DistributedSampler`` pads.) It is a
    ``DistributedSampler`` so that Lightning leaves it in place under DDP; Lightning calls
    ``set_epoch``. :meth:`resume` skips what a checkpointed run had already trained on.
    """

    def __init__(self, n: int, seed: int, batch_size: int = 1, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.n, self.seed, self.batch_size = n, seed, batch_size
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.skip: tuple[int, int] = (-1, 0)  # (epoch, global examples of it already trained on)
        self.shuffle, self.drop_last = True, False  # what a DistributedSampler is asked

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches: int) -> None:
        """Start ``epoch`` after its first ``batches`` (per-rank) batches, as a checkpoint saved then left it."""
        self.skip = (epoch, batches * self.batch_size * self.num_replicas)

    def order(self, epoch: int) -> list[int]:
        """The epoch's global order (every rank's examples, batch after batch)."""
        generator = torch.Generator().manual_seed(hash((self.seed, epoch)))  # ints hash the same in every process
        return torch.randperm(self.n, generator=generator).tolist()

    def _share(self, order: list[int]) -> list[int]:
        size, share = self.batch_size * self.num_replicas, []
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            per_rank = -(-len(batch) // self.num_replicas)
            batch += batch[: per_rank * self.num_replicas - len(batch)]
            share += batch[self.rank * per_rank : (self.rank + 1) * per_rank]
        return share

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        if self.skip[0] == self.epoch:
            order = order[self.skip[1] :]
        return iter(self._share(order))

    def __len__(self) -> int:
        return len(self._share(list(range(self.n))))


class ResumableLoader(DataLoader):
    """The training loader, which keeps its own place: the epoch of its order and the batches of
    that epoch it has yielded. Lightning saves its ``state_dict()`` in every checkpoint and gives it
    back to ``load_state_dict`` on resume, so a resumed run trains on the rest of the epoch and then
    on the epochs after it, as the uninterrupted run would have.

    The place is counted here, not read from the trainer: a run that ``max_steps`` stops mid-epoch
    ends its epoch in Lightning's count, and a resume from that point would otherwise start the
    next epoch's order, skipping the rest of this one. An ``iter`` after an iterator that yielded
    batches starts the next epoch; the first, one after a resume, and one replacing an iterator
    Lightning made but never read (it makes two when it resumes at an epoch's end) go on where the
    place is. An epoch counts as done once ``epoch_length()`` batches of it are yielded
    (``limit_train_batches`` may cut it short)."""

    def __init__(self, *args, epoch_length: Callable[[], float], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_length = epoch_length
        self.epoch, self.batches = 0, 0  # where the order is: its epoch, the batches of it yielded
        self._read, self._resuming = False, False  # the last iterator yielded; a checkpoint's place is due

    def state_dict(self) -> dict[str, int]:
        if self.batches >= min(len(self), self.epoch_length()):  # a finished epoch: the next one is due
            return {"epoch": self.epoch + 1, "batches": 0}
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches = state["epoch"], state["batches"]
        self._resuming = True

    def __iter__(self) -> Iterator:
        if self._resuming:
            self._resuming = False
        elif self._read:
            self.epoch, self.batches = self.epoch + 1, 0
        self._read = False
        return self._epoch()

    def _epoch(self) -> Iterator:
        # The sampler's place is set when the first batch is asked for: Lightning calls set_epoch
        # with its own count between ``iter`` and then, and its count runs one ahead of this one
        # after a resume from a run that max_steps stopped mid-epoch.
        self.sampler.set_epoch(self.epoch)
        self.sampler.resume(self.epoch, self.batches)
        for batch in super().__iter__():
            self.batches, self._read = self.batches + 1, True
            yield batch


class TokenizedDataModule(LightningDataModule):
    """What a data module of tokenized splits shares: its loaders.

    A subclass sets ``train_dataset`` and ``val_dataset`` in ``setup()`` and has ``collator``,
    ``batch_size``, ``eval_batch_size``, ``num_workers`` and ``seed``.
    """

    train_dataset: TokenizedDataset | None = None
    val_dataset: TokenizedDataset | None = None

    def _loader(self, dataset: TokenizedDataset | Subset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        kwargs = dict(batch_size=batch_size, collate_fn=self.collator, num_workers=self.num_workers,
                      persistent_workers=self.num_workers > 0)  # fmt: skip
        if not shuffle:
            return DataLoader(dataset, **kwargs)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochShuffle(len(dataset), self.shuffle_seed, batch_size, world, rank)
        return ResumableLoader(dataset, sampler=sampler, epoch_length=self._epoch_length, **kwargs)

    def _epoch_length(self) -> float:
        """The training batches an epoch takes (``limit_train_batches``; infinite: no trainer yet)."""
        return math.inf if self.trainer is None else self.trainer.num_training_batches

    def train_dataloader(self) -> DataLoader:
        """Training batches of ``batch_size`` examples, shuffled per epoch (:class:`EpochShuffle`)."""
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches of ``eval_batch_size`` examples in order (empty list: none)."""
        if self.val_dataset is not None and not len(self.val_dataset):
            return []
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    @property
    def shuffle_seed(self) -> int:
        """The training order's seed: the data's ``seed`` and the run's (``seed_everything``), so
        runs that differ in either see their examples in another order."""
        return hash((self.seed, int(os.environ.get("PL_GLOBAL_SEED", 0))))

    def train_indices(self, batches: int, per_epoch: int | None = None) -> list[int]:
        """The examples of the first ``batches`` training batches, epoch after epoch (at most
        ``per_epoch`` batches of each), as :meth:`train_dataloader` will yield them to all ranks."""
        n = len(self.train_dataset)
        world = self.trainer.world_size if self.trainer is not None else 1
        size = self.batch_size * world
        per_epoch = min(per_epoch or math.inf, math.ceil(n / size))
        sampler, indices, epoch = EpochShuffle(n, self.shuffle_seed), [], 0
        while batches > 0 and per_epoch > 0:
            take = min(batches, per_epoch)
            indices += sampler.order(epoch)[: take * size]
            batches, epoch = batches - take, epoch + 1
            if len(set(indices)) == n:
                break
        return sorted(set(indices))


class PreferenceDataModule(TokenizedDataModule):
    """Preference pairs (or KTO's unpaired examples), tokenized in ``setup()``.

    Args:
        tokenizer_name: Tokenizer to load with :func:`dpo_lit.models.load_tokenizer` (linked from
            the model's name by the CLI).
        train_files: Training data: files (``.jsonl``, ``.json``, ``.csv``, optionally ``.gz``, or
            ``.parquet``; in a config file, relative to the config's folder) or Hub splits
            (``hub:Anthropic/hh-rlhf?data_dir=helpful-base&split=test``, read from the local
            mirror ``$DPO_LIT_DATA`` when it holds them, :mod:`dpo_lit.data.hub`).
        val_files: Validation data, the same way; without it ``val_fraction`` of the training data
            is held out.
        val_fraction: Fraction held out for validation when no validation data is given (0: none).
        seed: Seed of the deterministic shuffle, validation split and ``max_examples`` sample.
        format: Data format; ``auto`` detects it per file from the first record's keys.
        mode: ``paired`` for DPO-style losses; ``unpaired`` for KTO (pairs become two examples,
            chosen labelled True and rejected False).
        max_length: Bound on prompt + completion tokens; completions are cut at the end.
        max_prompt_length: Bound on prompt tokens, applied first (``None``: only ``max_length``).
        truncation_mode: ``keep_end`` keeps the end of a long prompt (nearest the answer),
            ``keep_start`` its start.
        batch_size: Training examples (pairs) per batch; a batch holds twice as many rows.
        eval_batch_size: Examples per validation batch (``None``: ``batch_size``).
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: Round each batch's length up to a multiple of this.
        on_bad_record: ``error`` stops at the first bad record, naming file, line and field;
            ``skip`` counts bad records and reports them once setup ends.
        max_examples: Keep at most this many examples per split (after the shuffle), for short runs.
        assistant_marker: Where implicit-prompt transcripts' prompts end (HH-RLHF's marker).
        extra_roles: Message roles to accept beside system, user, assistant and tool, for chat
            templates that define more (any other role is a bad record).
    """

    def __init__(
        self,
        tokenizer_name: str,
        train_files: list[DataSource] | None = None,
        val_files: list[DataSource] | None = None,
        val_fraction: float = 0.05,
        seed: int = 0,
        format: Format = "auto",
        mode: Literal["paired", "unpaired"] = "paired",
        max_length: int = 1024,
        max_prompt_length: int | None = 512,
        truncation_mode: Literal["keep_end", "keep_start"] = "keep_end",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        on_bad_record: Literal["error", "skip"] = "error",
        max_examples: int | None = None,
        assistant_marker: str = "\n\nAssistant:",
        extra_roles: list[str] | None = None,
    ) -> None:
        super().__init__()
        if not train_files:
            raise ConfigError("data.train_files: PreferenceDataModule needs at least one training file or Hub split")
        if max_prompt_length is not None and max_prompt_length >= max_length:
            raise ConfigError(
                f"data.max_prompt_length: max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("max_length", max_length),
                           ("max_prompt_length", max_prompt_length), ("max_examples", max_examples),
                           ("pad_to_multiple_of", pad_to_multiple_of)):  # fmt: skip
            if value is not None and value < 1:
                raise ConfigError(f"data.{key}: must be at least 1, got {value}")
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer_name
        self.train_files, self.val_files = list(train_files or []), list(val_files or [])
        self.val_fraction, self.seed = val_fraction, seed
        self.format: Format = format
        self.mode: Mode = mode
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.truncation_mode: TruncationMode = truncation_mode
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pad_to_multiple_of = num_workers, pad_to_multiple_of
        self.on_bad_record: OnBadRecord = on_bad_record
        self.max_examples, self.assistant_marker = max_examples, assistant_marker
        self.extra_roles = list(extra_roles or [])
        self.train_dataset: TokenizedDataset | None = None
        self.val_dataset: TokenizedDataset | None = None

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer named by ``tokenizer_name`` (loaded on first use)."""
        from dpo_lit.models import load_tokenizer

        return load_tokenizer(self.tokenizer_name)

    @cached_property
    def collator(self) -> PreferenceCollator:
        """Pads batches with the tokenizer's pad id; bounds KTO's mismatched rows by ``max_length``."""
        return PreferenceCollator(self.tokenizer.pad_token_id, self.max_length, self.pad_to_multiple_of)

    def _read(self, sources: list[str], report: DataReport) -> list[Example]:
        return read_examples(sources, self.format, self.mode, report, self.assistant_marker, self.extra_roles)

    def _tokenize(self, examples: list[Example], report: DataReport) -> TokenizedDataset:
        examples = prepare(examples, self.mode, self.max_examples)
        tokenized = tokenize_examples(
            examples, self.tokenizer, self.max_length, self.max_prompt_length, self.truncation_mode, report
        )
        return TokenizedDataset(tokenized)

    def setup(self, stage: str | None = None) -> None:
        """Read, split, cap and tokenize both splits once; then warn what was skipped or dropped."""
        if self.train_dataset is not None:
            return
        report = DataReport(self.on_bad_record)
        train = self._read(self.train_files, report)
        if self.val_files:
            val = shuffled(self._read(self.val_files, report), self.seed)
            train = shuffled(train, self.seed)
            held_out = "from " + ", ".join(self.val_files)
        else:
            train, val = split_examples(train, self.val_fraction, self.seed)
            held_out = f"{self.val_fraction:g} of the training records"
        train_dataset, val_dataset = self._tokenize(train, report), self._tokenize(val, report)
        rank_zero_info(
            f"data: {len(train_dataset)} train and {len(val_dataset)} validation {self.mode} examples from "
            f"{', '.join(self.train_files)} (validation: {held_out}); {report.summary()}"
        )
        report.warn(self.max_length, self.max_prompt_length)
        if not train_dataset:
            raise DataError(", ".join(self.train_files), "no training examples left after skipping and dropping")
        self.train_dataset, self.val_dataset = train_dataset, val_dataset

    def ordered_dataloader(self, split: Literal["train", "val"], indices: Sequence[int] | None = None) -> DataLoader:
        """Batches of ``split`` (only ``indices``, if given) in dataset order with ``eval_batch_size``
        (reference log-probs)."""
        datasets = {"train": self.train_dataset, "val": self.val_dataset}
        if split not in datasets:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        dataset = datasets[split] if indices is None else Subset(datasets[split], list(indices))
        return self._loader(dataset, self.eval_batch_size, shuffle=False)
