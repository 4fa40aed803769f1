"""Rule-based rewards on the completion's form: its length, and whether a pattern occurs."""

from __future__ import annotations

import re
from collections.abc import Sequence

from dpo_lit.errors import ConfigError
from dpo_lit.rewards.base import Reward


def repeated_fraction(words: Sequence[str], n: int) -> float:
    """Share of a text's word n-grams that repeat an earlier one (0 for fewer than n words)."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


class LengthReward(Reward):
    """Closeness to a target length in words, with optional penalties::

        r = −|words − target_words| / target_words
            − unfinished_penalty · [completion cut by max_new_tokens]
            − repetition_penalty · (share of word n-grams that repeat an earlier one)

    0 is the best score; a completion of twice the target (or an empty one) scores −1 before
    penalties. Words are whitespace-separated. The unfinished penalty applies only when the
    caller passes ``finished`` flags.

    Args:
        target_words: The length that scores best, in words (> 0).
        unfinished_penalty: Subtracted from completions that did not end with the EOS.
        repetition_penalty: Weight of the repeated n-gram share (in [0, 1]; degenerate loops → 1).
        ngram: n of the repeated n-grams.
    """

    def __init__(
        self,
        target_words: int = 50,
        unfinished_penalty: float = 0.0,
        repetition_penalty: float = 0.0,
        ngram: int = 3,
    ) -> None:
        if target_words <= 0 or ngram <= 0:
            raise ConfigError(f"LengthReward: target_words and ngram must be positive, got {target_words} and {ngram}")
        self.target_words = target_words
        self.unfinished_penalty = unfinished_penalty
        self.repetition_penalty = repetition_penalty
        self.ngram = ngram

    def score(
        self, prompts: list[str], completions: list[str], finished: Sequence[bool] | None
    ) -> list[float]:
        scores = []
        for i, completion in enumerate(completions):
            words = completion.split()
            r = -abs(len(words) - self.target_words) / self.target_words
            if finished is not None and not finished[i]:
                r -= self.unfinished_penalty
            if self.repetition_penalty:
                r -= self.repetition_penalty * repeated_fraction(words, self.ngram)
            scores.append(r)
        return scores

    @property
    def name(self) -> str:
        return "length"


class RegexReward(Reward):
    """``reward`` when a regular expression matches the completion, else 0.

    Args:
        pattern: A Python regular expression, searched anywhere in the completion.
        reward: Score of a matching completion.
        ignore_case: Match case-insensitively.
        full_match: The whole completion (stripped of surrounding whitespace) must match.
    """

    def __init__(
        self, pattern: str, reward: float = 1.0, ignore_case: bool = False, full_match: bool = False
    ) -> None:
        self.pattern, self.reward = pattern, reward
        self.ignore_case, self.full_match = ignore_case, full_match
        self.regex = re.compile(pattern, re.IGNORECASE if ignore_case else 0)

    def score(
        self, prompts: list[str], completions: list[str], finished: Sequence[bool] | None
    ) -> list[float]:
        if self.full_match:
            return [self.reward if self.regex.fullmatch(c.strip()) else 0.0 for c in completions]
        return [self.reward if self.regex.search(c) else 0.0 for c in completions]

    @property
    def name(self) -> str:
        return "regex"


class ContainsReward(RegexReward):
    """``reward`` when the completion contains ``text`` (literally), else 0.

    Args:
        text: The substring to look for.
        reward: Score of a completion that contains it.
        ignore_case: Compare case-insensitively.
    """

    def __init__(self, text: str, reward: float = 1.0, ignore_case: bool = True) -> None:
        super().__init__(re.escape(text), reward, ignore_case)
        self.text = text

    @property
    def name(self) -> str:
        return "contains"
