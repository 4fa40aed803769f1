"""PPO's arithmetic on (B, T) tensors of response tokens, each piece a small function.

``mask`` is 1 on a rollout's response tokens and 0 after its last one (rows are right-padded).
Conventions follow Ziegler et al. (2019) and Huang et al. (2024, "The N+ Implementation Details of
RLHF with PPO"): the score is added at the last response token, a per-token KL penalty
``-kl_coef · (log π - log π_ref)`` everywhere, advantages by GAE and whitened over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is 1 (0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``(values - mean) / std`` over the masked entries; ``shift_mean=False`` keeps the mean."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def token_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards (B, T): ``-kl_coef · (log π - log π_ref)`` on every response token, plus
    each rollout's score (B,) on its last one."""
    rewards = -kl_coef * (logps - ref_logps) * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()  # (B, T) True at the last token
    return rewards + last * scores[:, None]


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    Args:
        rewards: (B, T) per-token rewards.
        values: (B, T) value estimates V(s_t) before each response token.
        mask: (B, T) 1 on response tokens, 0 after the last one (the value there counts as 0).
        gamma: discount.
        lam: GAE's λ (1: Monte-Carlo returns minus values; 0: one-step TD errors).

    Returns:
        ``(advantages, returns)``, (B, T) each, 0 after the last token; ``returns = advantages + values``.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@dataclass
class PolicyLoss:
    loss: Tensor
    clipfrac: Tensor
    approx_kl: Tensor


def policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip_range: float) -> PolicyLoss:
    """PPO's clipped surrogate ``mean(max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)))`` with ``ρ = π/π_old``, the
    share of tokens where the clipped term won, and ``½·mean((log ρ)²)`` (an estimate of KL(π_old‖π))."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return PolicyLoss(
        loss=masked_mean(torch.maximum(unclipped, clipped), mask),
        clipfrac=masked_mean((clipped > unclipped).float(), mask),
        approx_kl=0.5 * masked_mean(log_ratio.detach() ** 2, mask),
    )


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float) -> Tensor:
    """Clipped value loss ``½·mean(max((V - R)², (V_clip - R)²))``, ``V_clip`` within ``clip_range``
    of the rollout's values."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class KLController:
    """The KL coefficient: fixed, or adapted towards ``target`` (Ziegler et al. 2019).

    After each rollout batch of ``n`` sequences with mean sequence KL ``kl``::

        coef ← coef · (1 + clip(kl / target - 1, -0.2, 0.2) · n / horizon)

    Args:
        coef: the initial coefficient.
        target: the sequence-level KL to steer towards (None: the coefficient stays fixed).
        horizon: how many sequences a full correction takes.
    """

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000) -> None:
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n / self.horizon
