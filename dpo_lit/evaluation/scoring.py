"""Shared machinery of the evaluations: rows of token ids scored in batches.

Every evaluation reduces to *rows*: a list of token ids of which the tokens from ``first_scored``
on are scored, each by the model's log-probability given everything before it. Rows are sorted by
length (longest first, as lm-evaluation-harness does) so that each right-padded batch wastes
little, and each batch is one forward pass through :func:`dpo_lit.logps.completion_states` and the head
(:func:`dpo_lit.logps.head_outputs`). Each
row gets its summed log-probability, its number of scored tokens and whether greedy decoding
reproduces all its scored tokens (lm-evaluation-harness's ``is_greedy``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from dpo_lit.data.collate import pad_rows
from dpo_lit.data.tokenize import added_prefix
from dpo_lit.logps import completion_states, head_outputs
from dpo_lit.models import evaluating
from dpo_lit.sharding import in_forward

__all__ = ["Row", "RowScore", "added_prefix", "evaluating", "max_positions", "pad_id", "score_rows", "start_token"]


@dataclass(frozen=True)
class Row:
    """Token ids of one sequence; tokens at positions ``>= first_scored`` are scored (``>= 1``)."""

    ids: list[int]
    first_scored: int


class RowScore(NamedTuple):
    """What :func:`score_rows` gives for one row.

    Args:
        logp: summed log-probability of the scored tokens.
        tokens: number of scored tokens.
        greedy: every scored token is the model's most likely next token (ties: the lowest id).
    """

    logp: float
    tokens: int
    greedy: bool


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id padded rows are filled with (masked out, so any id would do)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that conditions a text with nothing before it: BOS, else EOS (lm-eval's prefix)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start an empty context with")
    return token


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model takes (``config.max_position_embeddings``), if it says."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _scored_tokens(model: nn.Module, ids: Tensor, attention: Tensor, scored: Tensor):
    states, targets, owner = completion_states(model, ids, attention, scored)  # (M, H), (M,), (M,)
    return head_outputs(model, states, targets, stats=("is_argmax",)), owner


def score_rows(model: nn.Module, rows: Sequence[Row], pad_id: int, batch_size: int) -> list[RowScore]:
    """Summed log-probability, number of scored tokens and greedy match of each row, in the order given.

    Call inside :func:`evaluating`. One forward pass per ``batch_size`` rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for row in rows:
        if row.first_scored < 1:
            raise ValueError("the first token of a row has no context and cannot be scored")
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    results: list[RowScore] = [RowScore(0.0, 0, True)] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, attention, scored = pad_rows(
            [rows[i].ids for i in batch], pad_id, first_scored=[rows[i].first_scored for i in batch]
        )  # (n, T) each
        # (M,) log-probs and greedy matches of the M scored tokens in all, each with its row in the batch
        head, owner = in_forward(model, _scored_tokens, ids.to(device), attention.to(device), scored.to(device))
        logps = head.logps.new_zeros(len(batch)).index_add(0, owner, head.logps)  # (n,)
        tokens = torch.bincount(owner, minlength=len(batch))  # (n,)
        misses = torch.bincount(owner[~head.is_argmax], minlength=len(batch))  # (n,)
        for i, logp, count, missed in zip(batch, logps.tolist(), tokens.tolist(), misses.tolist()):
            results[i] = RowScore(logp, int(count), missed == 0)
    return results
