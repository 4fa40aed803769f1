"""Shared machinery of the evaluations: rows of token ids scored in batches.

Every evaluation reduces to *rows*: a list of token ids of which the tokens from ``first_scored``
on are scored, each by the model's log-probability given everything before it. Rows are sorted by
length (longest first, as lm-evaluation-harness does) so that each right-padded batch wastes
little, and each batch is one forward pass through :func:`dpo_lit.logps.completion_logps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase

from dpo_lit.data.collate import pad_rows
from dpo_lit.data.tokenize import added_prefix
from dpo_lit.logps import completion_logps
from dpo_lit.models import evaluating

__all__ = ["Row", "added_prefix", "evaluating", "pad_id", "score_rows", "start_token"]


@dataclass(frozen=True)
class Row:
    """Token ids of one sequence; tokens at positions ``>= first_scored`` are scored (``>= 1``)."""

    ids: list[int]
    first_scored: int


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id padded rows are filled with (masked out, so any id would do)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that conditions a text with nothing before it: BOS, else EOS (lm-eval's prefix)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start an empty context with")
    return token


def score_rows(
    model: nn.Module, rows: Sequence[Row], pad_id: int, batch_size: int
) -> list[tuple[float, int]]:
    """Summed log-probability and number of scored tokens of each row, in the order given.

    Call inside :func:`evaluating`. One forward pass per ``batch_size`` rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for row in rows:
        if row.first_scored < 1:
            raise ValueError("the first token of a row has no context and cannot be scored")
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, attention, scored = pad_rows(
            [rows[i].ids for i in batch], pad_id, first_scored=[rows[i].first_scored for i in batch]
        )  # (n, T) each
        logps, tokens = completion_logps(model, ids.to(device), attention.to(device), scored.to(device))  # (n,), (n,)
        for i, logp, count in zip(batch, logps.tolist(), tokens.tolist()):
            results[i] = (logp, int(count))
    return results
