"""Multiple-choice evaluation by log-likelihood, as lm-evaluation-harness scores it.

Each (item, choice) pair becomes one row ``context + continuation``; the summed log-probability of
the continuation's tokens is the choice's score. ``acc`` picks the highest score, ``acc_norm`` the
highest score per character of the choice (lm-eval's length normalisation, which favours neither
short nor long answers as much).

Tokenisation follows lm-eval's ``_encode_pair``: trailing spaces of the context move to the
continuation, ``context + continuation`` is encoded as a whole and the continuation's tokens are
the whole's tokens after the context's own encoding. Texts are encoded without special tokens; a
BOS that the tokenizer adds by itself is put in front, and an empty context becomes the BOS (or
EOS) token, so that the first continuation token always has something to condition on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase

from dpo_lit.evaluation.scoring import (
    Row,
    added_prefix,
    evaluating,
    max_positions,
    pad_id,
    score_rows,
    start_token,
)


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question.

    Args:
        context: the prompt, e.g. ``"Question: ...\\nAnswer:"``.
        choices: the continuations, each with its leading delimiter, e.g. ``" Paris"``.
        answer: index of the correct choice.
    """

    context: str
    choices: list[str]
    answer: int


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str, prefix: Sequence[int] = ()
) -> tuple[list[int], list[int]]:
    """Context ids (``prefix`` in front) and continuation ids, concatenated they are what the model sees."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = _encode(tokenizer, context)
    continuation_ids = _encode(tokenizer, context + continuation)[len(context_ids) :]
    context_ids = [*prefix, *context_ids] or [start_token(tokenizer)]
    return context_ids, continuation_ids


def norm_length(choice: str) -> int:
    """Characters of a choice for ``acc_norm``: lm-eval divides by ``len(choice)`` where the model
    sees ``" " + choice``, so a leading space (the delimiter) is not counted."""
    return max(1, len(choice) - choice.startswith(" "))


def pair_row(
    tokenizer: PreTrainedTokenizerBase,
    context: str,
    continuation: str,
    prefix: Sequence[int],
    max_length: int | None,
) -> Row:
    """The row ``context + continuation`` scoring the continuation (see :func:`encode_pair`); a row
    longer than ``max_length`` loses tokens from the left of the context."""
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation, prefix)
    ids, first = context_ids + continuation_ids, len(context_ids)
    if max_length is not None and len(ids) > max_length:
        cut = len(ids) - max_length
        ids, first = ids[cut:], max(1, first - cut)
    return Row(ids, first)


def item_rows(
    tokenizer: PreTrainedTokenizerBase, item: MCItem, prefix: Sequence[int], max_length: int | None
) -> list[Row]:
    """One row per choice (:func:`pair_row`)."""
    return [pair_row(tokenizer, item.context, choice, prefix, max_length) for choice in item.choices]


def score_choices(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[MCItem],
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[list[tuple[float, int]]]:
    """For each item, each choice's ``(summed log-likelihood, length in characters)``.

    The length is :func:`norm_length` (the choice's characters without its leading space). All
    rows of all items are batched together, ``batch_size`` rows per forward pass. ``max_length``
    defaults to the model's ``max_position_embeddings``.
    """
    if max_length is None:
        max_length = max_positions(model)
    prefix = added_prefix(tokenizer)
    rows = [row for item in items for row in item_rows(tokenizer, item, prefix, max_length)]
    with evaluating(model):
        scores = score_rows(model, rows, pad_id(tokenizer), batch_size)
    out, k = [], 0
    for item in items:
        out.append([(scores[k + j].logp, norm_length(choice)) for j, choice in enumerate(item.choices)])
        k += len(item.choices)
    return out


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of ties, like numpy


def mc_metrics(scores: Sequence[Sequence[tuple[float, int]]], answers: Sequence[int]) -> dict[str, float]:
    """``acc``, ``acc_norm`` and ``n`` from :func:`score_choices`' output and the gold indices."""
    if not scores:
        raise ValueError("no items to evaluate")
    acc = sum(_argmax([ll for ll, _ in s]) == a for s, a in zip(scores, answers, strict=True))
    acc_norm = sum(_argmax([ll / n for ll, n in s]) == a for s, a in zip(scores, answers, strict=True))
    return {"acc": acc / len(scores), "acc_norm": acc_norm / len(scores), "n": len(scores)}


def evaluate_mc(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, items: Sequence[MCItem], batch_size: int = 8
) -> dict[str, float]:
    """``{"acc", "acc_norm", "n"}`` of ``model`` on ``items`` (see :func:`score_choices`)."""
    return mc_metrics(score_choices(model, tokenizer, items, batch_size), [item.answer for item in items])
