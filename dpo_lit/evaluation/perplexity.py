"""Perplexity of a long text (WikiText-2 by default), in disjoint windows.

The text is tokenized once, without special tokens, and cut into windows of ``context_length``
tokens. Consecutive windows share one token: the last token of a window is the first of the next,
where it serves only as context. So every token but the first of the text is scored exactly once,
and each with at most ``context_length - 1`` tokens of context. When the tokenizer adds a BOS by
itself, every window starts with it (unscored), for models that were trained always to see one.

Departure from lm-evaluation-harness: its ``loglikelihood_rolling`` conditions the first window on
an end-of-text (or BOS) token so that the text's first token is scored too, and it scores each
WikiText *document* separately. Here the text is one stream and its first token is not scored
(the difference is one token in thousands). Its windows are likewise disjoint, each with one
token of context from the previous one, so a window's first tokens see little context: the
perplexity is higher than with a sliding window that has a long overlap.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from dpo_lit.evaluation.scoring import Row, added_prefix, evaluating, pad_id, score_rows


@dataclass(frozen=True)
class PerplexityResult:
    """Per-token negative log-likelihood of a text and what follows from it.

    Args:
        nll: mean negative log-likelihood per scored token, in nats.
        ppl: token-level perplexity, ``exp(nll)``.
        tokens: number of scored tokens.
        word_ppl: ``exp(total NLL / words)`` with words split on whitespace (lm-eval's
            ``word_perplexity``; comparable across tokenizers).
        bits_per_byte: ``total NLL / (UTF-8 bytes · ln 2)`` (lm-eval's ``bits_per_byte``).
    """

    nll: float
    ppl: float
    tokens: int
    word_ppl: float = math.nan
    bits_per_byte: float = math.nan


def load_text(path: str | Path, max_chars: int | None = None) -> str:
    """The UTF-8 text of ``path``, optionally only its first ``max_chars`` characters."""
    with Path(path).open(encoding="utf-8") as f:
        return f.read(max_chars) if max_chars is not None else f.read()


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` (no special tokens), at most ``max_tokens`` of them.

    With a cap, only a prefix of the text long enough for ``max_tokens + 1`` tokens is tokenized
    (8 characters a token, doubled until enough); the last, possibly cut, token is dropped.
    """
    if max_tokens is None:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    chars = 8 * (max_tokens + 1)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) > max_tokens or chars >= len(text):
            return ids[:max_tokens]
        chars *= 2


def windows(ids: list[int], context_length: int, prefix: list[int]) -> list[Row]:
    """Rows ``prefix + ids[s : s + n]`` with ``n = context_length - len(prefix)`` and step ``n - 1``.

    Each row scores its tokens after the first text token; the rows' scored tokens partition
    ``ids[1:]``.
    """
    n = context_length - len(prefix)
    if n < 2:
        raise ValueError(f"context_length={context_length} leaves no token to score after the prefix")
    return [
        Row(prefix + ids[start : start + n], len(prefix) + 1)
        for start in range(0, max(1, len(ids) - 1), n - 1)
    ]


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    max_tokens: int | None = None,
    context_length: int = 512,
    batch_size: int = 4,
) -> PerplexityResult:
    """Token-level perplexity of ``text`` (see the module docstring for the windows).

    Args:
        model: a causal LM; evaluated in eval mode without gradients, its modes restored after.
        tokenizer: the model's tokenizer.
        text: the text; its first token is context only.
        max_tokens: score only the first ``max_tokens`` tokens of the text (CPU runs).
        context_length: tokens per window, a BOS included.
        batch_size: windows per forward pass.
    """
    ids = text_ids(tokenizer, text, max_tokens)
    if len(ids) < 2:
        raise ValueError("perplexity needs a text of at least two tokens")
    with evaluating(model):
        scores = score_rows(
            model, windows(ids, context_length, added_prefix(tokenizer)), pad_id(tokenizer), batch_size
        )
    total = -sum(score.logp for score in scores)
    tokens = sum(score.tokens for score in scores)
    covered = tokenizer.decode(ids) if max_tokens is not None else text  # what the tokens spell
    words = max(1, len(re.split(r"\s+", covered.strip())))
    n_bytes = max(1, len(covered.encode("utf-8")))
    return PerplexityResult(
        nll=total / tokens,
        ppl=math.exp(total / tokens),
        tokens=tokens,
        word_ppl=math.exp(total / words),
        bits_per_byte=total / n_bytes / math.log(2),
    )
