"""Pairwise judges: which of two completions of a prompt is better, and the win rate they give.

A :class:`Judge` takes prompts and two completions of each and returns, per prompt, 1.0 when the
first is better, 0.0 when the second is, 0.5 for a tie. Online DPO picks its chosen completion with
one; :func:`~dpo_lit.sampling.measure.win_rate` and the :class:`~dpo_lit.callbacks.WinRate` callback
measure a policy against the reference with one.

- :class:`RewardJudge`: the completion a reward scores higher (a classifier such as
  :class:`~dpo_lit.rewards.SentimentClassifier`, a rule, VADER, any
  :class:`~dpo_lit.rewards.Reward`); scores within ``tie_margin`` of each other tie.
- :class:`RewardModelJudge`: a trained reward model (a :class:`~dpo_lit.rlhf.RewardModule` export)
  as the judge.

No judge here calls a network service; an LLM-as-judge is a subclass of :class:`Judge` away.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from dpo_lit.data.prompts import Prompt
from dpo_lit.errors import ConfigError
from dpo_lit.rewards import Reward, RewardModel


class Judge(ABC):
    """Compares two completions of each prompt (see the module docstring)."""

    def __call__(
        self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str],
        first_finished: Sequence[bool] | None = None, second_finished: Sequence[bool] | None = None,
    ) -> Tensor:
        """(N,) float32: 1.0 where ``first[i]`` is better, 0.0 where ``second[i]`` is, 0.5 for a tie."""
        if not len(prompts) == len(first) == len(second):
            raise ValueError(f"{type(self).__name__}: {len(prompts)} prompts, {len(first)} and {len(second)} completions")
        verdicts = torch.as_tensor(self.judge(prompts, first, second, first_finished, second_finished), dtype=torch.float32)
        if verdicts.shape != (len(prompts),) or not bool(((verdicts >= 0) & (verdicts <= 1)).all()):
            raise ValueError(f"{type(self).__name__}: expected {len(prompts)} verdicts in [0, 1], got {verdicts}")
        return verdicts

    @abstractmethod
    def judge(
        self, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str],
        first_finished: Sequence[bool] | None, second_finished: Sequence[bool] | None,
    ) -> Tensor:
        """The verdicts; :meth:`__call__` checks their shape and range."""


class RewardJudge(Judge):
    """The completion ``reward`` scores higher wins; scores within ``tie_margin`` tie.

    Args:
        reward: any reward (``class_path``: SentimentClassifier, VaderSentiment, LengthReward, ...).
        tie_margin: how close two scores must be to count as a tie (0: only equal scores).
    """

    def __init__(self, reward: Reward, tie_margin: float = 0.0) -> None:
        if tie_margin < 0:
            raise ConfigError(f"judge.tie_margin: must be >= 0, got {tie_margin}")
        self.reward, self.tie_margin = reward, tie_margin

    def judge(self, prompts, first, second, first_finished, second_finished) -> Tensor:
        n = len(prompts)
        finished = None if first_finished is None or second_finished is None else [*first_finished, *second_finished]
        scores = self.reward([*prompts, *prompts], [*first, *second], finished)
        a, b = scores[:n], scores[n:]
        return torch.where((a - b).abs() <= self.tie_margin, 0.5, (a > b).float())


class RewardModelJudge(RewardJudge):
    """A trained reward model as the judge (:class:`~dpo_lit.rewards.RewardModel`'s arguments).

    Args:
        path: the exported reward model folder.
        batch_size: completions scored per forward pass.
        chat: render prompts with the chat template (None: when the tokenizer has one).
        tie_margin: how close two rewards must be to count as a tie.
    """

    def __init__(self, path: str, batch_size: int = 16, chat: bool | None = None, tie_margin: float = 0.0) -> None:
        super().__init__(RewardModel(path, batch_size=batch_size, chat=chat), tie_margin)

