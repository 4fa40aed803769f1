"""APO: Anchored Preference Optimization, which fixes the direction each log-ratio must move."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import LogRatioLoss, margin


def apo_zero_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """Per-example APO-zero loss (B,): ``1 - σ(β·c) + σ(β·r)``, c and r the chosen and rejected log-ratios."""
    c, r = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)


def apo_down_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """Per-example APO-down loss (B,): ``σ(β·c) + 1 - σ(β·h)``, c the chosen log-ratio, h = c - r."""
    h = margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return torch.sigmoid(beta * (policy_chosen - ref_chosen)) + 1 - torch.sigmoid(beta * h)


class APOZeroLoss(LogRatioLoss):
    """APO-zero (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266).

    Eq. 7 of the paper, with ``r_θ(x, y) = β·log π(y|x)/π_ref(y|x)``::

        L = -σ(r_θ(x, y_w)) + σ(r_θ(x, y_l))

    pushes the chosen likelihood up and the rejected one down, each on its own (for when the
    chosen answers are better than the model's own). Departure: the constant 1 is added, as in
    TRL, so the loss lies in [0, 2] and is 1 at ``c = r = 0``; gradients are the paper's.
    Rewards are ``β·(log π - log π_ref)``, detached.

    Args:
        beta: Scale β of the log-ratios inside the sigmoids. Must be > 0.
    """

    loss_fn = staticmethod(apo_zero_loss)


class APODownLoss(LogRatioLoss):
    """APO-down (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266).

    Eq. 8 of the paper, with ``r_θ`` as in :class:`APOZeroLoss`::

        L = σ(r_θ(x, y_w)) - σ(r_θ(x, y_w) - r_θ(x, y_l))

    pushes both likelihoods down, the rejected one more (for when the chosen answers are worse
    than the model's own). Departure: the constant 1 is added, as in TRL, so the loss lies in
    [0, 2] and is 1 at ``c = r = 0``. Rewards as in :class:`APOZeroLoss`.

    Args:
        beta: Scale β of the log-ratios inside the sigmoids. Must be > 0.
    """

    loss_fn = staticmethod(apo_down_loss)
