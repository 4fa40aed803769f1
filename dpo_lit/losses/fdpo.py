"""f-DPO: DPO under other f-divergence constraints than the reverse KL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_lit.errors import ConfigError

from .base import KEY, LossOutput, PairLogps, PreferenceLoss, check_beta, log_ratio_output

Divergence = Literal["reverse_kl", "forward_kl", "js", "alpha"]

# exp() arguments are clamped to at most this: exp(80) ≈ 5.5e34 is still finite in float32.
MAX_EXPONENT = 80.0


def _exp(x: Tensor) -> Tensor:
    return torch.exp(x.clamp(max=MAX_EXPONENT))


# f'(u) of each divergence as a function of the log-ratio lr = log u (constants dropped: they
# cancel between chosen and rejected).
SCORES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": lambda lr, alpha: lr,  # f'(u) = log u + 1
    "forward_kl": lambda lr, alpha: -_exp(-lr),  # f'(u) = 1 - 1/u
    "js": lambda lr, alpha: F.logsigmoid(lr),  # f'(u) = log(2u / (1 + u)) = log 2 + log σ(lr)
    "alpha": lambda lr, alpha: -_exp(-alpha * lr) / alpha,  # f'(u) = (1 - u^-α) / α
}


def fdpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    divergence: Divergence = "reverse_kl",
    alpha: float = 0.5,
) -> Tensor:
    """Per-example f-DPO loss (B,): ``-logσ(β·(f'(u_c) - f'(u_r)))``, u the policy/reference ratios.

    f' is taken from :data:`SCORES` as a function of the log-ratio; ``alpha`` is used by ``"alpha"`` only.
    """
    score = SCORES[divergence]
    chosen = score(policy_chosen - ref_chosen, alpha)
    rejected = score(policy_rejected - ref_rejected, alpha)
    return -F.logsigmoid(beta * (chosen - rejected))


class FDPOLoss(PreferenceLoss):
    """f-DPO (Wang et al. 2023, https://arxiv.org/abs/2309.16240).

    The paper's loss: with the KL penalty of RLHF replaced by an f-divergence, the optimal
    policy gives the loss, with ``u = π(y|x)/π_ref(y|x)``::

        L = -log σ(β·f'(u(y_w)) - β·f'(u(y_l)))

    for (Table 1, constants dropped): reverse KL ``f'(u) = log u`` (DPO itself); forward KL
    ``f'(u) = -1/u``; Jensen-Shannon ``f'(u) = log(u/(1+u)) = log σ(log u)``; α-divergence
    ``f'(u) = -u^(-α)/α`` with 0 < α < 1, which tends to the reverse KL as α → 0 and to the
    forward KL as α → 1. Departures: exponents are clamped at 80 so that the forward-KL and
    α scores stay finite in float32 when the policy has moved far below the reference (TRL
    clamps only its α-divergence branch: its forward-KL score ``-exp(-log u)`` overflows to
    -inf, and the loss to inf or NaN, once a completion's log-ratio falls below about -88.7);
    α follows the paper (TRL ≥ 1.0 writes the paper's α as 1 - α; equal at 0.5).
    Rewards are ``β·(log π - log π_ref)`` for every divergence, as in the other losses, detached.

    Args:
        beta: Scale β of the score difference. Must be > 0.
        divergence: ``reverse_kl``, ``forward_kl``, ``js`` or ``alpha``.
        alpha: α of the α-divergence, in (0, 1); ignored by the other divergences.
    """

    needs_reference = True

    def __init__(self, beta: float = 0.1, divergence: Divergence = "reverse_kl", alpha: float = 0.5) -> None:
        super().__init__()
        name = type(self).__name__
        check_beta(name, beta)
        if divergence not in SCORES:
            raise ConfigError(f"{KEY}divergence: {name}'s divergence must be one of {', '.join(SCORES)}, got {divergence!r}")
        if not 0.0 < alpha < 1.0:
            raise ConfigError(f"{KEY}alpha: {name}'s alpha must satisfy 0 < alpha < 1, got {alpha}")
        self.beta = beta
        self.divergence = divergence
        self.alpha = alpha

    def forward(self, logps: PairLogps) -> LossOutput:
        return log_ratio_output(logps, type(self).__name__, self.beta, fdpo_loss, self.divergence, self.alpha)
