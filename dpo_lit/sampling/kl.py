"""Sequence-level KL(π ‖ π_ref) estimated on samples from the policy.

For completions ``y_1..y_n ~ π(· | x)``, ``mean_i [log π(y_i | x) − log π_ref(y_i | x)]`` is an
unbiased estimate of ``KL(π(·|x) ‖ π_ref(·|x))`` averaged over the prompts. Its standard error is
taken over prompts (:func:`mean_se`): the k samples of a prompt are averaged first and the error is
``std / √P`` over those P prompt means, since samples of one prompt are not independent draws.
What exactly it estimates:

- the distributions are those of *truncated* sampling: a completion ends at its EOS or after
  ``max_new_tokens`` tokens, and both models score the same token sequence (a cut completion has
  no EOS term). That is the KL of what ``sample`` produces, not of unbounded generation;
- the samples are drawn at temperature 1 without top-k/top-p. With top-p the same average would
  be ``E_{top-p samples}[log π − log π_ref]``, which is not a KL;
- ``log π`` comes from ``generate``'s raw logits (:mod:`dpo_lit.sampling.sample`), ``log π_ref`` from
  one forward of the reference over the prompt + completion rows (:func:`~dpo_lit.logps.completion_logps`).

Individual terms can be negative; only their mean is a KL. This is the KL to report as
``KL``: the chosen-completion log-ratio of a DPO batch is not one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from dpo_lit.data.collate import pad_rows
from dpo_lit.logps import completion_logps
from dpo_lit.models import evaluating
from dpo_lit.sampling.sample import Sample, sample, special_ids


@dataclass
class KLEstimate:
    """A Monte-Carlo KL estimate.

    Attributes:
        mean: Mean of the per-sample log-ratios, in nats per completion.
        stderr: Its standard error over prompts: the standard deviation of the per-prompt means
            over √(prompts) (:func:`mean_se`; ``nan`` for one prompt).
        n: Number of samples.
        per_sample: ``log π(y) − log π_ref(y)`` of every sample, in sample order.
        finished_fraction: Share of samples that ended with an EOS (the rest were cut).
    """

    mean: float
    stderr: float
    n: int
    per_sample: list[float]
    finished_fraction: float


def sequence_logps(
    model: nn.Module,
    samples: Sequence[Sample],
    batch_size: int = 16,
    context: Callable[[], AbstractContextManager] | None = None,
    pad_token_id: int = 0,
    temperature: float = 1.0,
) -> list[float]:
    """``log model(completion | prompt)`` of every sample, one forward per batch of rows.

    Args:
        model: A causal LM; run in eval mode under no_grad (its mode restored after).
        samples: Samples with ``prompt_ids`` and ``completion_ids``.
        batch_size: Rows per forward.
        context: Entered around the forwards, e.g. ``policy.disable_adapter`` for a LoRA policy
            whose base weights are the reference.
        pad_token_id: Fills the right padding (masked out; any id works).
        temperature: Log-probs under softmax(logits / ``temperature``).
    """
    device = next(model.parameters()).device
    out: list[float] = []
    with evaluating(model), context() if context is not None else contextlib.nullcontext():
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            ids, attention, completion = pad_rows(
                [s.prompt_ids + s.completion_ids for s in batch], pad_token_id,
                first_scored=[len(s.prompt_ids) for s in batch],
            )  # (N, T) each
            logps, _ = completion_logps(
                model, ids.to(device), attention.to(device), completion.to(device), temperature=temperature
            )  # (N,)
            out += logps.tolist()
    return out


SE_CAPTION = "± one standard error over prompts (each prompt's samples averaged first)"
"""What every table of :func:`mean_se`'s grouped standard errors says under it."""


def mean_se(values: Sequence[float] | Tensor, groups: Sequence[int] | None = None) -> tuple[float, float]:
    """Mean and standard error of the mean, in float64 (``nan`` for one value or one group).

    Without ``groups``: ``std / √n`` over the values. With ``groups`` (the prompt of each value):
    the values of a prompt are averaged first and the standard error is taken over those prompt
    means, ``std_p / √P``. k samples of one prompt are not k independent draws (their rewards and
    log-ratios move together), so the plain ``std / √(P·k)`` would understate the error of a
    comparison over P prompts; the mean is then the mean over prompts (the plain mean when every
    prompt has the same number of samples)."""
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if groups is not None:
        values = prompt_means(values, groups)
    n = values.numel()
    if n == 0:
        raise ValueError("the mean of zero values is undefined")
    return float(values.mean()), float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan


def prompt_means(values: Tensor, groups: Sequence[int]) -> Tensor:
    """The mean of each group's values, (P,), groups in first-seen order."""
    if len(groups) != values.numel():
        raise ValueError(f"{values.numel()} values but {len(groups)} group labels")
    order = {group: k for k, group in enumerate(dict.fromkeys(groups))}
    index = torch.tensor([order[group] for group in groups])
    sums = torch.zeros(len(order), dtype=torch.float64).index_add_(0, index, values)
    counts = torch.zeros(len(order), dtype=torch.float64).index_add_(0, index, torch.ones_like(values))
    return sums / counts


def summarize(per_sample: Sequence[float], finished: Sequence[bool], prompts: Sequence[int] | None = None) -> KLEstimate:
    """Mean, standard error (over prompts when ``prompts`` gives each sample's) and finished share
    of per-sample log-ratios."""
    if not per_sample:
        raise ValueError("cannot estimate a KL from zero samples")
    mean, stderr = mean_se(per_sample, prompts)
    return KLEstimate(mean, stderr, len(per_sample), list(per_sample), sum(finished) / len(per_sample))


def kl_from_samples(
    samples: Sequence[Sample],
    reference: nn.Module,
    batch_size: int = 16,
    reference_context: Callable[[], AbstractContextManager] | None = None,
    pad_token_id: int = 0,
) -> KLEstimate:
    """KL(π ‖ π_ref) from samples of π whose ``logp`` is already known (see the module docstring).

    The samples must come from the policy at temperature 1 without top-k/top-p for the estimate
    to be a KL. ``reference_context`` is entered around the reference's forwards.
    """
    ref = sequence_logps(reference, samples, batch_size, reference_context, pad_token_id)
    per_sample = [s.logp - r for s, r in zip(samples, ref)]
    return summarize(per_sample, [s.finished for s in samples], [s.prompt_index for s in samples])


def estimate_kl(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    prompts: Sequence[Sequence[int]],
    num_samples: int = 4,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    seed: int = 0,
    reference_context: Callable[[], AbstractContextManager] | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> KLEstimate:
    """Sample ``num_samples`` completions of each prompt from ``policy`` and estimate KL(π ‖ π_ref).

    Args:
        policy: The model sampled from (temperature 1, no top-k/top-p: an unbiased estimate of the
            KL between the ``max_new_tokens``-truncated sampling distributions).
        reference: The reference model; may be ``policy`` itself with ``reference_context``.
        tokenizer: Supplies EOS/pad ids; ``None`` works with explicit ids.
        prompts: Token ids of each prompt.
        num_samples: Completions per prompt.
        max_new_tokens: Bound on completion tokens.
        batch_size: Rows per ``generate`` call and per reference forward.
        seed: Sampling seed (the global RNG state is left untouched).
        reference_context: Called and entered around the reference's forwards, e.g.
            ``policy.disable_adapter`` with ``reference=policy`` for a LoRA policy.
        eos_token_id: Ends a completion (default: the tokenizer's, else the policy's).
        pad_token_id: Padding id (default: the tokenizer's pad, else the EOS).
    """
    samples = sample(
        policy,
        tokenizer,
        prompts,
        num_samples,
        max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    _, pad = special_ids(policy, tokenizer, eos_token_id, pad_token_id)
    return kl_from_samples(samples, reference, batch_size, reference_context, pad)
