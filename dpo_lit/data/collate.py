"""Collate tokenized examples into right-padded batches with completion masks.

The batch contract (B examples, T the longest row, rounded up to ``pad_to_multiple_of``):

==================  =============  ==========================================================
key                 shape, dtype   content
==================  =============  ==========================================================
``input_ids``       (2B, T) long   paired: rows 0..B-1 prompt+chosen, rows B..2B-1
                                   prompt+rejected; unpaired: rows 0..B-1 prompt_i +
                                   completion_i, rows B..2B-1 prompt_i + completion_j of a
                                   row j with another prompt, usually j = (i - k) mod B for
                                   one k; empty if every row shares one prompt (mismatched
                                   pairs, KTO's KL reference point; see
                                   :func:`mismatched_partners`); right-padded with
                                   ``pad_token_id``
``attention_mask``  (2B, T) long   1 on real tokens, 0 on padding
``completion_mask`` (2B, T) bool   True exactly on completion tokens (incl. the closing EOS)
``index``           (B,) long      the examples' positions in their dataset
``label``           (B,) bool      unpaired only: whether completion_i is desirable
==================  =============  ==========================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dpo_lit.data.tokenize import TokenizedExample


def pad_rows(
    rows: Sequence[Sequence[int]],
    pad_id: int,
    first_scored: Sequence[int] | None = None,
    left: bool = False,
    multiple_of: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pad rows of token ids into one batch: the one padder of the project.

    Args:
        rows: Token ids of each row.
        pad_id: Fills the padding (masked out; any id works).
        first_scored: Per row, the position from which its tokens are scored (a prompt's length);
            ``None``: no token is scored.
        left: Pad on the left (for ``generate``) instead of the right.
        multiple_of: Round the width up to a multiple of this.

    Returns:
        ``input_ids`` (N, T) long, ``attention_mask`` (N, T) long (1 on real tokens) and
        ``scored_mask`` (N, T) bool (True on each row's tokens from ``first_scored`` on).
    """
    width = max((len(r) for r in rows), default=0)
    if multiple_of:
        width = -(-width // multiple_of) * multiple_of
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, T)
    scored_mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (N, T)
    for i, row in enumerate(rows):
        start = width - len(row) if left else 0
        end = start + len(row)
        input_ids[i, start:end] = torch.tensor(list(row), dtype=torch.long)
        attention_mask[i, start:end] = 1
        if first_scored is not None:
            scored_mask[i, start + first_scored[i] : end] = True
    return input_ids, attention_mask, scored_mask


def mismatched_partners(prompts: Sequence[Sequence[int]]) -> list[int | None]:
    """Per row i, the row whose completion KTO's mismatched row i pairs with ``prompts[i]``.

    A mismatched pair must never put a prompt with a completion written for it (token ids
    compared: rather than the source pair, since datasets hold several pairs of one prompt, and
    the ids are what the model sees). A plain shift by one row (TRL's) does wherever neighbouring
    rows share a prompt: unpaired mode lays each pair out as two adjacent rows (chosen, rejected)
    of one prompt, so in dataset order every second mismatched row would be matched and bias z0
    towards the implied reward. So:

    1. the smallest shift ``k >= 1`` that suits every row, ``j = (i - k) mod B``: the
       mismatched completions are then the batch's own completions, each once (k = 2 for
       adjacent pairs, k = 1 for most shuffled batches);
    2. if no shift suits every row (e.g. most rows share one prompt), each row's nearest
       earlier row (cyclically) with another prompt; a completion may then serve twice;
    3. ``None`` where no row has another prompt. That happens to every row at once, when the
       whole batch shares one prompt (B = 1 included): those rows get an empty completion,
       their log-ratio is exactly 0, so the batch's z0 is 0 (KTO without a reference point)
       rather than an estimate from matched pairs.
    """
    ids: dict[tuple[int, ...], int] = {}
    group = [ids.setdefault(tuple(p), len(ids)) for p in prompts]  # equal prompts, equal group
    n = len(group)
    for k in range(1, n):
        if all(group[i - k] != group[i] for i in range(n)):  # i - k < 0 wraps round
            return [(i - k) % n for i in range(n)]
    return [
        next(((i - k) % n for k in range(1, n) if group[i - k] != group[i]), None) for i in range(n)
    ]


class PreferenceCollator:
    """Turn a list of tokenized examples (paired or unpaired) into one batch. Picklable.

    Args:
        pad_token_id: The id right-padding fills with (masked out; any id works).
        max_length: Bound on the mismatched rows of unpaired batches (their completion's end is
            cut, as in tokenisation); ``None`` leaves them whole.
        pad_to_multiple_of: Round the batch's length up to a multiple of this.
    """

    def __init__(
        self, pad_token_id: int, max_length: int | None = None, pad_to_multiple_of: int | None = None
    ) -> None:
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        prompts = [e["prompt_ids"] for e in examples]
        if "chosen_ids" in examples[0]:
            completions = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
            batch = self._pad(prompts + prompts, completions)
        else:
            batch = self._pad(prompts + prompts, self._unpaired_completions(examples))
            batch["label"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
        batch["index"] = torch.tensor(
            [int(e.get("index", i)) for i, e in enumerate(examples)], dtype=torch.long
        )
        return batch

    def _unpaired_completions(self, examples: Sequence[TokenizedExample]) -> list[list[int]]:
        """Matched completions, then each row's mismatched completion (cut to ``max_length``)."""
        matched = [e["completion_ids"] for e in examples]
        partners = mismatched_partners([e["prompt_ids"] for e in examples])
        mismatched = []
        for e, j in zip(examples, partners):
            completion = matched[j] if j is not None else []
            if self.max_length is not None:
                completion = completion[: max(self.max_length - len(e["prompt_ids"]), 0)]
            mismatched.append(completion)
        return matched + mismatched

    def _pad(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask, completion_mask = pad_rows(
            [p + c for p, c in zip(prompts, completions)], self.pad_token_id,
            first_scored=[len(p) for p in prompts], multiple_of=self.pad_to_multiple_of,
        )  # (2B, T) each
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pad_token_id={self.pad_token_id}, max_length={self.max_length}, "
            f"pad_to_multiple_of={self.pad_to_multiple_of})"
        )
