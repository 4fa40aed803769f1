"""The reward interface: texts in, one float per completion out.

A reward holds only its settings (its typed, documented ``__init__`` is what the CLI builds);
anything heavy (a lexicon, a classifier, a reward model) is loaded lazily on first call. Calling
it scores a batch::

    scores = reward(prompts, completions, finished)  # (N,) float32

A prompt is a string or a conversation (a list of ``{"role", "content"}`` messages), passed as
it is: a reward that reads conversations (:class:`~dpo_lit.rewards.RewardModel`, which renders
them as its training data was rendered) gets it whole, while a text reward gets the last
message's content (:func:`~dpo_lit.data.prompts.prompt_text`). A caller that reduces a
conversation to text itself takes the conversation away from a reward model.

``finished`` says which completions ended with the model's EOS (the rest were cut by
``max_new_tokens``); rewards that do not need it ignore it.

To plug in a trained classifier or a learned reward model, subclass :class:`Reward`: take the
model's name (and device, batch size, ...) as typed ``__init__`` arguments, load it in a
``functools.cached_property``, and return its scores from :meth:`Reward.score`, e.g. the logit of
the positive class or the reward head's output for ``prompt + completion``. YAML then names it by
``class_path``. For a quick experiment, :class:`CallableReward` imports a plain function.
"""

from __future__ import annotations

import importlib
import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from dpo_lit.data.prompts import Prompt, prompt_text
from dpo_lit.errors import ConfigError


class Reward(ABC):
    """Scores completions of prompts; subclasses implement :meth:`score`."""

    reads_conversations: ClassVar[bool] = False
    """Whether :meth:`score` gets message-list prompts whole (else their last message's text)."""

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[str], finished: Sequence[bool] | None = None
    ) -> Tensor:
        """Scores of shape (N,), float32, one per completion.

        Args:
            prompts: The prompt of each completion: a string or a list of messages.
            completions: The completions, as text (without special tokens).
            finished: Whether each completion ended with the EOS (``None``: unknown).
        """
        if len(prompts) != len(completions) or (finished is not None and len(finished) != len(completions)):
            raise ValueError(
                f"{self.name}: {len(prompts)} prompts, {len(completions)} completions"
                + ("" if finished is None else f", {len(finished)} finished flags")
            )
        given = list(prompts) if self.reads_conversations else [prompt_text(p) for p in prompts]
        scores = torch.as_tensor(self.score(given, list(completions), finished), dtype=torch.float32)
        if scores.shape != (len(completions),):
            raise ValueError(
                f"{self.name}: expected {len(completions)} scores, got shape {tuple(scores.shape)}"
            )
        return scores

    @abstractmethod
    def score(
        self, prompts: list[str], completions: list[str], finished: Sequence[bool] | None
    ) -> Tensor | Sequence[float]:
        """One score per completion (any float sequence; :meth:`__call__` checks and converts it).

        ``prompts`` are strings, or strings and message lists if :attr:`reads_conversations`.
        """

    @property
    def name(self) -> str:
        """Short name for metrics and logs (``reward/<name>``): the class name in snake case."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()


def import_object(path: str) -> object:
    """The object named by ``package.module:attr`` or ``package.module.attr``."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"model.reward.init_args.fn: expected a dotted path like 'package.module.function', got {path!r}")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"model.reward.init_args.fn: cannot import {module_name!r} (from {path!r}): {error}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model.reward.init_args.fn: {module_name!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


class CallableReward(Reward):
    """A reward computed by a plain function, named by its dotted import path.

    Args:
        fn: ``package.module.function`` or ``package.module:function``. It is called as
            ``fn(prompts, completions)`` (or with ``finished=...`` too when it has a ``finished``
            parameter) and returns one float per completion (a list or a tensor).
    """

    def __init__(self, fn: str) -> None:
        self.fn = fn
        # Imported now: a wrong path fails when the config is built, not mid-run.
        self.function: Callable = import_object(fn)
        if not callable(self.function):
            raise ConfigError(f"model.reward.init_args.fn: {fn!r} is not callable")

    def score(
        self, prompts: list[str], completions: list[str], finished: Sequence[bool] | None
    ) -> Tensor | Sequence[float]:
        try:
            takes_finished = "finished" in inspect.signature(self.function).parameters
        except (TypeError, ValueError):  # builtins without a signature
            takes_finished = False
        if takes_finished:
            return self.function(prompts, completions, finished=finished)
        return self.function(prompts, completions)

    @property
    def name(self) -> str:
        return re.split(r"[.:]", self.fn)[-1]
