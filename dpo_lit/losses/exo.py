"""EXO: efficient exact optimisation, a reverse KL between the model's and the data's preference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_lit.errors import ConfigError

from .base import KEY, LossOutput, PairLogps, PreferenceLoss, check_beta, log_ratio_output, margin


def exo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    epsilon: float = 1e-3,
) -> Tensor:
    """Per-example pairwise EXO loss (B,): ``KL([σ(βh), σ(-βh)] ‖ [1-ε, ε])``.

    ``= σ(βh)·(logσ(βh) - log(1-ε)) + σ(-βh)·(logσ(-βh) - log ε)``; zero where σ(βh) = 1 - ε.
    """
    x = beta * margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    chosen = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-epsilon))
    rejected = torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(epsilon))
    return chosen + rejected


class EXOLoss(PreferenceLoss):
    """EXO, pairwise (Ji et al. 2024, https://arxiv.org/abs/2402.00856).

    Eq. 16 of the paper with K = 2 completions: the reverse KL from the model's preference
    distribution ``p_θ = softmax(β·log π/π_ref)`` over {y_w, y_l} to the data's ``p_rh``::

        L = Σ_i p_θ(i)·(log p_θ(i) - log p_rh(i)),   p_θ(y_w) = σ(βh)

    Departure, as TRL's ``exo_pair``: without reward scores ``p_rh`` is the hard preference
    smoothed by ε, ``[1-ε, ε]`` (ε = 0 would make the loss infinite). The minimum, 0, is at
    ``σ(βh) = 1 - ε``; DPO's loss has no minimum at finite h. Rewards are
    ``β·(log π - log π_ref)``, detached.

    Args:
        beta: β_π of the paper, the scale of the log-ratios. Must be > 0.
        epsilon: Probability ε the data gives the rejected completion, in (0, 0.5).
    """

    needs_reference = True

    def __init__(self, beta: float = 0.1, epsilon: float = 1e-3) -> None:
        super().__init__()
        check_beta(type(self).__name__, beta)
        if not 0.0 < epsilon < 0.5:
            raise ConfigError(f"{KEY}epsilon: {type(self).__name__}'s epsilon must satisfy 0 < epsilon < 0.5, got {epsilon}")
        self.beta = beta
        self.epsilon = epsilon

    def forward(self, logps: PairLogps) -> LossOutput:
        return log_ratio_output(logps, type(self).__name__, self.beta, exo_loss, self.epsilon)
