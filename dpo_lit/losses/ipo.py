"""IPO: Identity Preference Optimisation (a squared loss on the log-ratio difference)."""

from __future__ import annotations

from torch import Tensor

from .base import (
    LossOutput,
    PairLogps,
    PreferenceLoss,
    average,
    check_beta,
    check_reference,
    margin,
    pairwise_output,
)


def ipo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """Per-example IPO loss (B,): ``(h - 1/(2β))²`` with h the log-ratio difference.

    Pass average (per-token) log-probs to get the length-normalised variant.
    """
    h = margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (h - 1 / (2 * beta)) ** 2


class IPOLoss(PreferenceLoss):
    """Identity Preference Optimisation (Azar et al. 2023, https://arxiv.org/abs/2310.12036).

    Eq. 17 of the paper (its τ is our β)::

        L = (h - 1/(2β))²,   h = log π(y_w|x)/π_ref(y_w|x) - log π(y_l|x)/π_ref(y_l|x)

    so ``h = 0`` gives ``1/(4β²)``. Departure: with ``length_normalize`` (the default, as in
    TRL) every log-prob is divided by its completion's token count before forming h; the
    paper uses summed log-probs. Rewards are ``β·(log π - log π_ref)`` of the same
    (normalised or not) log-probs, detached.

    Args:
        beta: Regularisation τ of the paper; the target log-ratio margin is 1/(2β). Must be > 0.
        length_normalize: Use average per-token log-probs instead of summed ones.
    """

    needs_reference = True

    def __init__(self, beta: float = 0.1, length_normalize: bool = True) -> None:
        super().__init__()
        check_beta(type(self).__name__, beta)
        self.beta = beta
        self.length_normalize = length_normalize

    def forward(self, logps: PairLogps) -> LossOutput:
        check_reference(logps, type(self).__name__)
        pc, pr, rc, rr = logps.policy_chosen, logps.policy_rejected, logps.ref_chosen, logps.ref_rejected
        if self.length_normalize:
            ct, rt = logps.chosen_tokens, logps.rejected_tokens
            pc, pr, rc, rr = average(pc, ct), average(pr, rt), average(rc, ct), average(rr, rt)
        losses = ipo_loss(pc, pr, rc, rr, self.beta)
        return pairwise_output(losses, self.beta * (pc - rc), self.beta * (pr - rr))
