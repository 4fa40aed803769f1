"""DiscoPOP: the log-ratio-modulated loss discovered by LLM-driven objective search."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_lit.errors import ConfigError

from .base import KEY, LossOutput, PairLogps, PreferenceLoss, check_beta, log_ratio_output, margin


def discopop_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    tau: float = 0.05,
) -> Tensor:
    """Per-example DiscoPOP loss (B,): ``(1 - σ(βh/τ))·softplus(-βh) + σ(βh/τ)·exp(-βh)``.

    The second term is computed as ``exp(logσ(βh/τ) - βh)`` so that it stays finite (0) for
    very negative βh, where ``exp(-βh)`` alone overflows.
    """
    x = beta * margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    mix = torch.sigmoid(x / tau)
    return (1 - mix) * F.softplus(-x) + torch.exp(F.logsigmoid(x / tau) - x)


class DiscoPOPLoss(PreferenceLoss):
    """DiscoPOP (Lu et al. 2024, https://arxiv.org/abs/2406.08414), log-ratio-modulated loss.

    Eq. 5 of the paper, with ρ = h the log-ratio difference as in DPO::

        f(βρ) = (1 - σ(βρ/τ))·f_logistic(βρ) + σ(βρ/τ)·f_exp(βρ),
        f_logistic(x) = -log σ(x),   f_exp(x) = exp(-x)

    a blend of DPO's logistic loss (for negative margins) and an exponential loss (for positive
    ones), switched by a sigmoid of temperature τ. At h = 0 it is ``(ln 2 + 1)/2``. Departure
    from a literal transcription only in numerics: ``σ(x/τ)·exp(-x)`` is evaluated as
    ``exp(logσ(x/τ) - x)``, so the loss and its gradient stay finite for any βh. The literal
    form, which TRL's ``loss_type="discopop"`` computes, is NaN in float32 once βh < -88.7:
    ``exp(-βh)`` overflows to inf and meets ``σ(βh/τ) = 0``. Rewards are
    ``β·(log π - log π_ref)``, detached.

    Args:
        beta: Scale β of the log-ratio difference. Must be > 0.
        tau: Temperature τ of the mixing sigmoid (the paper's 0.05). Must be > 0.
    """

    needs_reference = True

    def __init__(self, beta: float = 0.1, tau: float = 0.05) -> None:
        super().__init__()
        check_beta(type(self).__name__, beta)
        if tau <= 0:
            raise ConfigError(f"{KEY}tau: {type(self).__name__}'s tau must be > 0, got {tau}")
        self.beta = beta
        self.tau = tau

    def forward(self, logps: PairLogps) -> LossOutput:
        return log_ratio_output(logps, type(self).__name__, self.beta, discopop_loss, self.tau)
