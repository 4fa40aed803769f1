"""Hinge loss on the log-ratio difference (SLiC / RSO)."""

from __future__ import annotations

from torch import Tensor

from .base import LossOutput, PairLogps, PreferenceLoss, check_beta, log_ratios, margin, pairwise_output


def hinge_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """Per-example hinge loss (B,): ``relu(1 - β·h)``."""
    h = margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (1 - beta * h).clamp(min=0)


class HingeLoss(PreferenceLoss):
    """Hinge (SLiC) calibration loss (Zhao et al. 2023, https://arxiv.org/abs/2305.10425).

    SLiC-HF's calibration loss is ``max(0, δ - log π(y_w|x) + log π(y_l|x))``. Departures,
    following RSO (Liu et al. 2023, https://arxiv.org/abs/2309.06657) and TRL: the log-probs
    are taken relative to the reference (h as in DPO) and scaled by β, giving
    ``relu(1 - β·h)`` (margin δ = 1/β in units of h); SLiC's separate cross-entropy
    regulariser is left out (add an :class:`SFTLoss` with :class:`CombinedLoss` for it).
    Rewards are ``β·(log π - log π_ref)``, detached.

    Args:
        beta: Scale of the log-ratio difference; the hinge margin in h is 1/β. Must be > 0.
    """

    needs_reference = True

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        check_beta("HingeLoss", beta)
        self.beta = beta

    def forward(self, logps: PairLogps) -> LossOutput:
        chosen, rejected = log_ratios(logps, type(self).__name__)
        losses = hinge_loss(
            logps.policy_chosen, logps.policy_rejected, logps.ref_chosen, logps.ref_rejected, self.beta
        )
        return pairwise_output(losses, self.beta * chosen, self.beta * rejected)
