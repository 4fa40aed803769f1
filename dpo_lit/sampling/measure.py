"""One held-out measurement of a policy, for every caller: :class:`~dpo_lit.callbacks.SampledKL`,
:class:`~dpo_lit.callbacks.HeldoutRewardKL`, the on-policy pipeline and ``dpo-lit compare``.

:func:`measure` samples ``num_samples`` completions of each prompt from the policy (temperature 1, no
top-k/top-p, a fixed seed, so two measurements with the same prompts and seed are paired sample by
sample), scores them with a reward when one is given, and scores the same token ids under the
reference when one is given: the unbiased sequence-level KL(π‖π_ref) of
:mod:`dpo_lit.sampling.kl`. Every mean comes with its standard error over prompts (a prompt's
samples are averaged first). :func:`paired_gain` compares two measurements prompt by prompt, :func:`win_rate` by a judge's verdicts.
:func:`reference_model` is the one way a module's reference is found for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dpo_lit.data.prompts import Prompt, prompt_text
from dpo_lit.sampling.kl import KLEstimate, kl_from_samples, mean_se, sequence_logps, summarize
from dpo_lit.sampling.sample import Sample, sample

if TYPE_CHECKING:
    from dpo_lit.judges import Judge
    from dpo_lit.rewards import Reward


@dataclass(frozen=True)
class MeasureSpec:
    """How a measurement samples: completions per prompt, their length bound, rows per batch, seed
    and temperature (1: the policy itself, and the KL is KL(π‖π_ref); T: the KL between the two
    models' softmax(logits / T), the distributions PPO's rollouts at T are drawn from and scored under)."""

    num_samples: int = 4
    max_new_tokens: int = 48
    batch_size: int = 16
    seed: int = 0
    temperature: float = 1.0


@dataclass
class HeldoutSample:
    """One scored completion of a measurement: its prompt, text, reward and log π/π_ref (``nan``
    where the measurement had no reward or no reference)."""

    step: int
    prompt_index: int
    prompt: str
    completion: str
    reward: float
    log_ratio: float
    finished: bool


@dataclass
class Measurement:
    """What :func:`measure` found: the reward and the KL, each ± its standard error over prompts
    (None where no reward or no reference was given), and every scored sample."""

    step: int
    samples: list[HeldoutSample]
    raw: list[Sample] = field(repr=False)
    reward: float | None = None
    reward_se: float | None = None
    kl: KLEstimate | None = None

    @property
    def finished(self) -> float:
        """The share of samples that ended with an EOS (the rest were cut at ``max_new_tokens``)."""
        return sum(s.finished for s in self.samples) / len(self.samples)

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor([s.reward for s in self.samples])


def score_samples(reward: Reward, prompts: Sequence[Prompt], samples: Sequence[Sample]) -> torch.Tensor:
    """The reward of every sample, (N,): each completion with its whole prompt (a reward model reads
    conversations whole)."""
    whole = [prompts[s.prompt_index] for s in samples]
    return reward(whole, [s.text for s in samples], [s.finished for s in samples])


def measure(
    policy: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    prompt_ids: Sequence[Sequence[int]],
    spec: MeasureSpec,
    reward: Reward | None = None,
    reference: nn.Module | None = None,
    context: Callable[[], AbstractContextManager] | None = None,
    step: int = 0,
    samples: list[Sample] | None = None,
) -> Measurement:
    """Sample from ``policy`` (or take ``samples``, drawn earlier with the same prompts and spec),
    score with ``reward`` and, when ``reference`` is given (run inside ``context()``), estimate
    KL(π‖π_ref) on the same token ids."""
    if samples is None:
        samples = sample(
            policy, tokenizer, prompt_ids, spec.num_samples, spec.max_new_tokens, temperature=spec.temperature,
            batch_size=spec.batch_size, seed=spec.seed,
        )
    prompt_of = [s.prompt_index for s in samples]
    kl = None
    if reference is not None and spec.temperature == 1.0:  # the samples' own logp is the policy's
        kl = kl_from_samples(samples, reference, spec.batch_size, context, tokenizer.pad_token_id)
    elif reference is not None:  # a sample's logp is the untempered model's: score both at T
        pad, t = tokenizer.pad_token_id, spec.temperature
        ours = sequence_logps(policy, samples, spec.batch_size, None, pad, temperature=t)
        theirs = sequence_logps(reference, samples, spec.batch_size, context, pad, temperature=t)
        kl = summarize([a - b for a, b in zip(ours, theirs)], [s.finished for s in samples], prompt_of)
    scores = [math.nan] * len(samples)
    if reward is not None:
        scores = score_samples(reward, prompts, samples).tolist()
    ratios = kl.per_sample if kl is not None else [math.nan] * len(samples)
    scored = [
        HeldoutSample(step, s.prompt_index, prompt_text(prompts[s.prompt_index]), s.text, score, ratio, s.finished)
        for s, score, ratio in zip(samples, scores, ratios, strict=True)
    ]
    mean, se = mean_se(scores, prompt_of) if reward is not None else (None, None)
    return Measurement(step, scored, samples, mean, se, kl)


def paired_gain(policy: Measurement, reference: Measurement) -> tuple[float, float]:
    """The mean over prompts of (policy − reference) reward, ± its standard error over prompts: the
    two measurements drew the same prompts with the same spec and seed, so they pair sample by sample."""
    if [s.prompt_index for s in policy.samples] != [s.prompt_index for s in reference.samples]:
        raise ValueError("paired_gain: the two measurements did not sample the same prompts in the same order")
    return mean_se(policy.rewards - reference.rewards, [s.prompt_index for s in policy.samples])


def win_rate(policy: Measurement, reference: Measurement, judge: Judge, prompts: Sequence[Prompt]) -> tuple[float, float]:
    """How often ``judge`` prefers the policy's sample to the reference's drawn for the same prompt
    with the same seed (ties count half): the mean over prompts ± its standard error over prompts."""
    if [s.prompt_index for s in policy.samples] != [s.prompt_index for s in reference.samples]:
        raise ValueError("win_rate: the two measurements did not sample the same prompts in the same order")
    whole = [prompts[s.prompt_index] for s in policy.samples]
    verdicts = judge(whole, [s.completion for s in policy.samples], [s.completion for s in reference.samples],
                     [s.finished for s in policy.samples], [s.finished for s in reference.samples])  # fmt: skip
    return mean_se(verdicts, [s.prompt_index for s in policy.samples])


def reference_model(pl_module: Any) -> tuple[nn.Module, Callable[[], AbstractContextManager]] | None:
    """``(model, context)`` of the module's reference; when it keeps none in memory (a reference-free
    loss, SFT, precomputed log-probs) and the policy is a LoRA model, the policy with its adapter
    off; else None."""
    found = pl_module.reference.model(pl_module.policy)
    if found is None and hasattr(pl_module.policy, "disable_adapter"):
        found = (pl_module.policy, pl_module.policy.disable_adapter)
    return found


__all__ = ["HeldoutSample", "MeasureSpec", "Measurement", "measure", "paired_gain", "reference_model", "score_samples",
           "win_rate"]
