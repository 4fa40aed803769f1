"""SimPO: reference-free, length-normalised preference optimisation with a target margin."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import LossOutput, PairLogps, PreferenceLoss, average, check_beta, pairwise_output


def simpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> Tensor:
    """Per-example SimPO loss (B,): ``-logσ(β·a_c - β·a_r - γ)`` with a = summed log-prob / tokens."""
    a_c, a_r = average(policy_chosen, chosen_tokens), average(policy_rejected, rejected_tokens)
    return -F.logsigmoid(beta * a_c - beta * a_r - gamma)


class SimPOLoss(PreferenceLoss):
    """Simple Preference Optimization (Meng et al. 2024, https://arxiv.org/abs/2405.14734).

    Eq. 6 of the paper::

        L = -log σ(β/|y_w|·log π(y_w|x) - β/|y_l|·log π(y_l|x) - γ)

    No reference model. γ is the paper's absolute target reward margin, as is TRL's
    ``simpo_gamma`` (its CPO trainer subtracts ``simpo_gamma/β`` from the average log-prob
    difference before scaling by β); the SimPO repository's optional label smoothing, which
    TRL applies there through ``label_smoothing``, is not included. Rewards are
    ``β·(average per-token log-prob)``, detached.

    Args:
        beta: Scale of the length-normalised log-prob reward. Must be > 0.
        gamma: Target reward margin γ between chosen and rejected.
    """

    needs_reference = False

    def __init__(self, beta: float = 2.0, gamma: float = 1.0) -> None:
        super().__init__()
        check_beta("SimPOLoss", beta)
        self.beta = beta
        self.gamma = gamma

    def forward(self, logps: PairLogps) -> LossOutput:
        a_c = average(logps.policy_chosen, logps.chosen_tokens)
        a_r = average(logps.policy_rejected, logps.rejected_tokens)
        losses = simpo_loss(
            logps.policy_chosen,
            logps.policy_rejected,
            logps.chosen_tokens,
            logps.rejected_tokens,
            self.beta,
            self.gamma,
        )
        return pairwise_output(losses, self.beta * a_c, self.beta * a_r)
