"""The online methods' arithmetic on (B, T) tensors of response tokens, each piece a small function.

``mask`` is 1 on a rollout's response tokens and 0 after its last one (rows are right-padded).

- PPO follows Ziegler et al. (2019) and Huang et al. (2024, "The N+ Implementation Details of RLHF
  with PPO"): the score is added at the last response token, a per-token KL penalty
  ``-kl_coef · (log π - log π_ref)`` everywhere, advantages by GAE and whitened over the batch.
- RLOO (Ahmadian et al. 2024, "Back to Basics"): k samples per prompt, each sample's advantage its
  score minus the mean of the other k - 1 (:func:`rloo_advantages`), a sequence-level REINFORCE
  loss (:func:`reinforce_loss`).
- GRPO (Shao et al. 2024, DeepSeekMath): advantages normalised within each prompt's group
  (:func:`group_advantages`), PPO's clipped ratio per token and the KL to the reference as a loss
  term (:func:`k3_kl`, :func:`grpo_loss`); Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
  Training") drops the division by the group's standard deviation and by each completion's length.

Rollouts are in prompt-major order: the k samples of a prompt are consecutive.
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


# ---- RLOO and GRPO: advantages within each prompt's group of k samples ------------------------------


def rloo_advantages(scores: Tensor, k: int) -> Tensor:
    """Each sample's score minus the mean score of the other ``k - 1`` samples of its prompt, (N,)
    for N = prompts · k scores in prompt-major order (the leave-one-out baseline of RLOO)."""
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got {k}")
    groups = scores.view(-1, k)
    baseline = (groups.sum(-1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).reshape(-1)


def group_advantages(scores: Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's advantages, (N,): each score minus its group's mean, divided by the group's standard
    deviation (the unbiased one, plus ``eps``) when ``scale``; Dr. GRPO leaves ``scale`` off."""
    if k < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt, got {k}")
    groups = scores.view(-1, k)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token estimate of KL(π‖π_ref) from tokens sampled from π (Schulman's k3):
    ``exp(r) - r - 1`` with ``r = log π_ref - log π``; never negative, unbiased."""
    r = ref_logps - logps
    return torch.exp(r) - r - 1


@dataclass
class GroupLoss:
    loss: Tensor
    clipfrac: Tensor
    kl: Tensor


def grpo_loss(
    logps: Tensor, old_logps: Tensor, ref_logps: Tensor | None, advantages: Tensor, mask: Tensor, clip_range: float,
    beta: float, normalization: str = "sequence", max_tokens: int | None = None,
) -> GroupLoss:
    """GRPO's loss over (B, T) response tokens with one advantage per rollout (B,).

    Per token: ``-min(ρ·A, clip(ρ, 1-ε, 1+ε)·A) + β·k3``, ``ρ = π/π_old``. Summed over a rollout's
    tokens and divided by its length, then averaged over rollouts (``normalization="sequence"``,
    GRPO's); divided by all the batch's tokens (``"token"``); or by rollouts × ``max_tokens``, a
    constant (``"constant"``, Dr. GRPO's: no length bias). The KL term needs ``ref_logps`` when
    ``beta > 0``. Returns the loss, the share of clipped tokens and the mean per-token KL.
    """
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * a
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logps) if ref_logps is None else k3_kl(logps, ref_logps)
    if beta:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta > 0 needs the reference's log-probs")
        per_token = per_token + beta * kl
    per_token = per_token * mask
    if normalization == "sequence":
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif normalization == "token":
        loss = per_token.sum() / mask.sum().clamp(min=1)
    elif normalization == "constant":
        if not max_tokens:
            raise ValueError("grpo_loss: normalization 'constant' needs max_tokens")
        loss = per_token.sum() / (len(per_token) * max_tokens)
    else:
        raise ValueError(f"grpo_loss: normalization must be sequence, token or constant, got {normalization!r}")
    return GroupLoss(loss, masked_mean((clipped < unclipped).float(), mask), masked_mean(kl.detach(), mask))


def reinforce_loss(logps: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Sequence-level REINFORCE: ``-mean_i A_i · Σ_t log π(y_it)`` over rollouts, (B, T) log-probs
    and one (detached) advantage per rollout (B,)."""
    return -(advantages.detach() * (logps * mask).sum(-1)).mean()
