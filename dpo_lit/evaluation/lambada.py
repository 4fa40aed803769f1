"""LAMBADA: predict the last word of a passage, scored as lm-evaluation-harness's ``lambada_openai``.

A passage is split on single spaces: the context is everything before the last word, the target is
``" " + last word`` (lm-eval's ``doc_to_text`` / ``doc_to_target``). Each item is one
context + target row (:func:`~dpo_lit.evaluation.multiple_choice.pair_row`, so the target's tokens
are those of the whole passage after the context's own tokens). Per item: the target's summed
log-likelihood and whether greedy decoding reproduces every target token. Metrics:

- ``acc``: the fraction of items whose target greedy decoding reproduces;
- ``ppl``: ``exp(-mean log-likelihood)`` over items (lm-eval's ``perplexity`` aggregation: the
  mean is over passages, not tokens, so a multi-token word counts as one).

``lambada_test_plain_text.txt`` is the original LAMBADA test set (lower case, punctuation split off
by spaces), the text of lm-eval's ``lambada_standard``; ``lambada_openai`` scores OpenAI's
detokenised version of the same 5,153 passages with the same prompt, so numbers on this file are
not those published for ``lambada_openai``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from dpo_lit.data.errors import DataError
from dpo_lit.evaluation.multiple_choice import pair_row
from dpo_lit.evaluation.scoring import RowScore, added_prefix, evaluating, max_positions, pad_id, score_rows


@dataclass(frozen=True)
class LambadaItem:
    """One passage, split for scoring.

    Args:
        context: the passage up to its last word, without the space before it.
        target: the last word with its leading space, e.g. ``" sarah"``.
    """

    context: str
    target: str


def split_passage(text: str, where: str) -> LambadaItem:
    """The context and target of a passage (lm-eval's ``text.split(' ')``); ``where`` names it in errors."""
    *words, last = text.split(" ")
    if not words or not last:
        raise DataError(where, f"a passage needs a last word after a space, got {text[-40:]!r}")
    return LambadaItem(" ".join(words), f" {last}")


def load_lambada(path: Path) -> list[LambadaItem]:
    """Passages one a line (surrounding whitespace stripped, blank lines skipped)."""
    items = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                items.append(split_passage(line.strip(), f"{path}:{number}"))
    return items


def score_targets(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[LambadaItem],
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[RowScore]:
    """Each target's summed log-likelihood given its context, token count and greedy match.

    ``max_length`` (default: the model's ``max_position_embeddings``) cuts long rows on the left.
    """
    if max_length is None:
        max_length = max_positions(model)
    prefix = added_prefix(tokenizer)
    rows = [pair_row(tokenizer, item.context, item.target, prefix, max_length) for item in items]
    with evaluating(model):
        return score_rows(model, rows, pad_id(tokenizer), batch_size)


def lambada_metrics(scores: Sequence[RowScore]) -> dict[str, float]:
    """``acc`` (mean greedy match), ``ppl`` (``exp`` of minus the mean log-likelihood) and ``n``."""
    if not scores:
        raise ValueError("no items to evaluate")
    acc = sum(score.greedy for score in scores) / len(scores)
    ppl = math.exp(-sum(score.logp for score in scores) / len(scores))
    return {"acc": acc, "ppl": ppl, "n": len(scores)}


def evaluate_lambada(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[LambadaItem],
    batch_size: int = 8,
) -> dict[str, float]:
    """``{"acc", "ppl", "n"}`` of ``model`` on ``items`` (see :func:`score_targets`)."""
    return lambada_metrics(score_targets(model, tokenizer, items, batch_size))
