"""Lexicon sentiment: VADER (Hutto & Gilbert, 2014), rule-based, no model and no download."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any, Literal

from dpo_lit.errors import ConfigError
from dpo_lit.rewards.base import Reward


class VaderSentiment(Reward):
    """VADER's polarity score of each completion (the prompt is ignored).

    ``compound`` is a normalised sum of the words' valences in [-1, 1] (about ±0.05 and beyond
    counts as positive or negative); ``pos``/``neg``/``neu`` are the shares of the text, in [0, 1],
    that read positive, negative or neutral. An empty completion scores 0 (``neu``: 0 as well).

    Args:
        field: Which of VADER's scores to return.
    """

    def __init__(self, field: Literal["compound", "pos", "neg", "neu"] = "compound") -> None:
        if field not in ("compound", "pos", "neg", "neu"):
            raise ConfigError(f"VaderSentiment: field must be compound, pos, neg or neu, got {field!r}")
        self.field = field

    @cached_property
    def analyzer(self) -> Any:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ImportError(
                "VaderSentiment needs the vaderSentiment package: pip install vaderSentiment"
            ) from None
        return SentimentIntensityAnalyzer()

    def score(
        self, prompts: list[str], completions: list[str], finished: Sequence[bool] | None
    ) -> list[float]:
        return [self.analyzer.polarity_scores(c)[self.field] if c.strip() else 0.0 for c in completions]

    @property
    def name(self) -> str:
        return f"vader_{self.field}"
