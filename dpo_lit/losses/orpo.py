"""ORPO: odds-ratio preference optimisation, an SFT loss plus an odds-ratio penalty."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_lit.errors import ConfigError

from .base import KEY, LossOutput, PairLogps, PreferenceLoss, average, pairwise_output

# Average log-probs are clamped to at most this before log(1 - exp(a)); see log1mexp.
MAX_AVG_LOGP = -1e-6


def log1mexp(a: Tensor) -> Tensor:
    """``log(1 - exp(a))`` for ``a <= 0``, computed stably as ``log(-expm1(a))``.

    ``a`` is clamped to ``<= MAX_AVG_LOGP`` (-1e-6) first: at ``a = 0`` the exact value is
    -inf. The clamp bounds the result at about -13.8 and its gradient at about 1e6; it has
    zero gradient for ``a`` above the clamp. For very negative ``a`` the result tends to 0.
    """
    return torch.log(-torch.expm1(a.clamp(max=MAX_AVG_LOGP)))


def orpo_log_odds(avg_chosen: Tensor, avg_rejected: Tensor) -> Tensor:
    """Log odds ratio (B,): ``log[odds(y_w)/odds(y_l)]`` with ``odds(y) = P/(1-P)``, ``P = exp(a)``."""
    return (avg_chosen - avg_rejected) - (log1mexp(avg_chosen) - log1mexp(avg_rejected))


def orpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    lam: float = 0.1,
) -> Tensor:
    """Per-example ORPO loss (B,): ``-a_c + λ·(-logσ(log_odds))``, a = average token log-prob."""
    a_c, a_r = average(policy_chosen, chosen_tokens), average(policy_rejected, rejected_tokens)
    return -a_c - lam * F.logsigmoid(orpo_log_odds(a_c, a_r))


class ORPOLoss(PreferenceLoss):
    """Odds Ratio Preference Optimization (Hong et al. 2024, https://arxiv.org/abs/2403.07691).

    Eqs. 6-7 of the paper, with ``P_θ(y|x) = exp(a)`` and a the average per-token log-prob::

        L = L_SFT + λ·L_OR,   L_OR = -log σ(log[odds(y_w|x) / odds(y_l|x)]),
        odds(y|x) = P_θ(y|x) / (1 - P_θ(y|x))

    No reference model. ``L_SFT = -a_c`` is the mean token NLL of the chosen completion per
    example, then averaged over the batch. TRL's NLL term differs twice: it covers the
    prompt tokens as well as the chosen completion's (every non-padding token of the chosen
    row), and it averages over all those tokens of the batch. ``log(1 - P)`` is computed as ``log(-expm1(a))`` with a clamped to <= -1e-6, so
    the loss stays finite when a completion has probability 1 (see :func:`log1mexp`).
    Rewards are ``λ·a`` (as TRL), detached. ``metrics``: ``log_odds_ratio`` (batch mean of
    the log odds ratio itself) and ``nll`` (batch mean of L_SFT).

    Args:
        lam: Weight λ of the odds-ratio term relative to the SFT term.
    """

    needs_reference = False

    def __init__(self, lam: float = 0.1) -> None:
        super().__init__()
        if lam < 0:
            raise ConfigError(f"{KEY}lam: ORPOLoss's lam must be >= 0, got {lam}")
        self.lam = lam

    def forward(self, logps: PairLogps) -> LossOutput:
        a_c = average(logps.policy_chosen, logps.chosen_tokens)
        a_r = average(logps.policy_rejected, logps.rejected_tokens)
        losses = orpo_loss(
            logps.policy_chosen, logps.policy_rejected, logps.chosen_tokens, logps.rejected_tokens, self.lam
        )
        return pairwise_output(
            losses, self.lam * a_c, self.lam * a_r, log_odds_ratio=orpo_log_odds(a_c, a_r).mean(), nll=-a_c.mean()
        )
