"""NCA: Noise Contrastive Alignment, pairwise form (absolute likelihoods, not only their gap)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import LogRatioLoss


def nca_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """Per-example pairwise NCA loss (B,): ``-logσ(βc) - ½·logσ(-βc) - ½·logσ(-βr)``."""
    c, r = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


class NCALoss(LogRatioLoss):
    """Noise Contrastive Alignment (Chen et al. 2024, https://arxiv.org/abs/2402.05369), pairwise.

    The NCA loss for K responses with rewards, reduced (as in TRL's ``nca_pair``) to a preferred
    and a dispreferred response with hard labels, ``r_θ = β·log π(y|x)/π_ref(y|x)``::

        L = -log σ(r_θ(x, y_w)) - ½·Σ_{y ∈ {y_w, y_l}} log σ(-r_θ(x, y))

    Unlike DPO it scores each completion against 0, not only against the other, so the chosen
    likelihood is held up instead of both falling. At ``c = r = 0`` the loss is ``2·ln 2``.
    Rewards are ``β·(log π - log π_ref)``, detached.

    Args:
        beta: Scale β of the log-ratios in the rewards r_θ. Must be > 0.
    """

    loss_fn = staticmethod(nca_loss)
