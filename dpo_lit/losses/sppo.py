"""SPPO with hard labels: squared regression of each log-ratio onto ±1/(2β)."""

from __future__ import annotations

from torch import Tensor

from .base import LogRatioLoss


def sppo_hard_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """Per-example SPPO (hard) loss (B,): ``(c - 1/(2β))² + (r + 1/(2β))²``, c and r the log-ratios."""
    c, r = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2


class SPPOHardLoss(LogRatioLoss):
    """Self-Play Preference Optimization, hard labels (Wu et al. 2024, https://arxiv.org/abs/2405.00675).

    Eq. 4.7 of the paper (Algorithm 1), with η = 1/β::

        L = (log π(y_w|x)/π_t(y_w|x) - η·(P(y_w ≻ π_t|x) - ½))²
          + (log π(y_l|x)/π_t(y_l|x) - η·(P(y_l ≻ π_t|x) - ½))²

    Departures, as TRL's ``sppo_hard``: the win probabilities P are the hard labels 1 (chosen)
    and 0 (rejected) instead of the paper's PairRM estimates, giving
    ``(c - 1/(2β))² + (r + 1/(2β))²``; π_t is the fixed reference, not the previous self-play
    iterate (run several rounds by hand for that). At ``c = r = 0`` the loss is ``1/(2β²)``.
    Rewards are ``β·(log π - log π_ref)``, detached.

    Args:
        beta: 1/η of the paper; the log-ratio targets are ±1/(2β). Must be > 0.
    """

    loss_fn = staticmethod(sppo_hard_loss)
