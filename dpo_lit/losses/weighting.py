"""Wrappers any pairwise loss can take: WPO's example weights and LD-DPO's length desensitisation.

Both change what the log-prob computation returns (``logps_options``), not the module: the
module passes the wrapper's options to :func:`dpo_lit.logps.completion_logps` whatever the loss.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from dpo_lit.errors import ConfigError
from dpo_lit.logps import LogpsOptions

from .base import KEY, LossOutput, PairLogps, PreferenceLoss, average, split_halves


def wpo_weights(
    aligned_chosen: Tensor, aligned_rejected: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor
) -> Tensor:
    """WPO weight of each pair (B,): ``w(y_w)·w(y_l)``, ``w(y) = exp(aligned sum / tokens)``, detached."""
    return torch.exp(average(aligned_chosen, chosen_tokens) + average(aligned_rejected, rejected_tokens)).detach()


class _PairWrapper(PreferenceLoss):
    """A pairwise loss with something added; arranges rows and computes through the wrapped loss."""

    def __init__(self, loss: PreferenceLoss) -> None:
        super().__init__()
        if loss.data_mode != "paired":
            raise ValueError(
                f"{type(self).__name__} wraps paired losses only, got {type(loss).__name__} "
                f"(data_mode={loss.data_mode})"
            )
        self.loss = loss
        self.needs_reference = loss.needs_reference
        self.per_example = loss.per_example

    def logps_from_rows(
        self, policy_logps: Tensor, ref_logps: Tensor | None, tokens: Tensor, batch: dict[str, Any]
    ) -> PairLogps:
        return self.loss.logps_from_rows(policy_logps, ref_logps, tokens, batch)

    def forward(self, logps: PairLogps) -> LossOutput:
        return self.loss(logps)


class WPOLoss(_PairWrapper):
    """Weighted Preference Optimization (Zhou et al. 2024, https://arxiv.org/abs/2406.11827).

    Weighs each pair's loss by how likely the policy is to have produced both completions, so
    off-policy pairs count as if sampled on-policy (the paper's objective with its "sampled"
    weight alignment, the variant it recommends and TRL's ``use_weighting``)::

        L = -E[w(x, y_w)·w(x, y_l)·log p(y_w ≻ y_l | x)],
        w(x, y) = exp((1/|y|)·Σ_t log[π(y_t|x, y_<t) / Σ_v π(v|x, y_<t)²])

    with the weights detached (no gradient through them). The division by ``Σ_v π(v)²`` (the
    probability a sample repeats itself) makes a pair sampled from the policy weigh about 1.
    Any pairwise loss can stand for ``-log p(y_w ≻ y_l)`` (DPO, IPO, SimPO, ...): ``losses`` are
    the wrapped loss's multiplied by the weights, and ``loss`` their mean. The aligned sums need
    the full-vocabulary ``logsumexp(2z)`` of every completion token, an extra pass over the
    logits asked for through ``logps_options`` (and only then). With LD-DPO the weights use the
    plain (unweighted) per-token log-probs, as in TRL. Not for AOT, whose terms are per quantile.
    Rewards and margins are the wrapped loss's; ``metrics["wpo_weight"]`` is the batch mean weight.

    Args:
        loss: The pairwise loss to weigh (``class_path`` in YAML).
    """

    def __init__(self, loss: PreferenceLoss) -> None:
        super().__init__(loss)
        if not loss.per_example:
            raise ValueError(f"WPOLoss: {type(loss).__name__}'s losses are not per example; they cannot be weighted")

    @property
    def logps_options(self) -> LogpsOptions:
        return replace(self.loss.logps_options or LogpsOptions(), aligned=True)

    def logps_from_rows(
        self, policy_logps: Tensor, ref_logps: Tensor | None, tokens: Tensor, batch: dict[str, Any]
    ) -> PairLogps:
        """Policy rows arrive as (2B, 2): [summed log-prob, aligned sum]."""
        logps = self.loss.logps_from_rows(policy_logps[:, 0], ref_logps, tokens, batch)
        logps.aligned_chosen, logps.aligned_rejected = split_halves(policy_logps[:, 1])
        return logps

    def forward(self, logps: PairLogps) -> LossOutput:
        if logps.aligned_chosen is None or logps.aligned_rejected is None:
            raise ValueError("WPOLoss needs the policy's aligned log-probs (compute them with its logps_options)")
        out = self.loss(logps)
        weights = wpo_weights(logps.aligned_chosen, logps.aligned_rejected, logps.chosen_tokens, logps.rejected_tokens)
        losses = out.losses * weights
        return replace(out, loss=losses.mean(), losses=losses, metrics={**out.metrics, "wpo_weight": weights.mean()})


class LDDPOLoss(_PairWrapper):
    """Length-desensitised log-probs, LD-DPO (Liu et al. 2024, https://arxiv.org/abs/2409.06411).

    Splits each completion at the pair's shorter length l_p and damps the log-probs of the
    longer completion's excess tokens, the part that carries mostly length::

        log π̂(y|x) = Σ_{t ≤ l_p} log π(y_t|x, y_<t) + α·Σ_{t > l_p} log π(y_t|x, y_<t)

    then evaluates the wrapped loss on π̂ in place of π (with DPO this is the paper's LD-DPO;
    α = 1 gives the wrapped loss back, α = 0 ignores the excess tokens). As in TRL (≥ 1.0) the
    reference's log-probs are desensitised the same way, so the log-ratios are 0 at the start;
    a precomputed reference table is keyed by α. Rewards, margins and ``logps/*`` metrics are
    then of π̂. The token weights are applied in the log-prob computation
    (``logps_options.ld_alpha``): the container holds π̂ sums, and the wrapped loss is unchanged.

    Args:
        loss: The pairwise loss to evaluate on desensitised log-probs (``class_path`` in YAML).
        alpha: Weight α of the tokens beyond the shorter completion's length, in [0, 1].
    """

    def __init__(self, loss: PreferenceLoss, alpha: float = 0.5) -> None:
        super().__init__(loss)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"{KEY}alpha: LDDPOLoss's alpha must satisfy 0 <= alpha <= 1, got {alpha}")
        self.alpha = alpha

    @property
    def logps_options(self) -> LogpsOptions:
        return replace(self.loss.logps_options or LogpsOptions(), ld_alpha=self.alpha)
