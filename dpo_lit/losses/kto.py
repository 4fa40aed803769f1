"""KTO: Kahneman-Tversky Optimisation on unpaired desirable / undesirable completions."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dpo_lit.errors import ConfigError

from .base import KEY, LossOutput, PreferenceLoss, UnpairedLogps, check_beta, reference_error, split_halves


def kto_reference_point(policy_kl: Tensor, ref_kl: Tensor) -> Tensor:
    """KL reference point z0 (scalar): ``max(0, mean(policy_kl - ref_kl))``, detached."""
    return (policy_kl - ref_kl).mean().clamp(min=0).detach()


def kto_loss(
    policy: Tensor,
    ref: Tensor,
    label: Tensor,
    z0: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """Per-example weighted KTO loss (B,): ``λ_y·(1 - σ(β·(r - z0)))`` if desirable,
    ``λ_y·(1 - σ(β·(z0 - r)))`` if not, with ``r = policy - ref``; ``label`` (B,) bool."""
    r = policy - ref
    losses = torch.where(label, 1 - torch.sigmoid(beta * (r - z0)), 1 - torch.sigmoid(beta * (z0 - r)))
    weights = torch.where(label, desirable_weight, undesirable_weight).to(losses.dtype)
    return weights * losses


class KTOLoss(PreferenceLoss):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306).

    Eq. 8 of the paper, with ``r = log π(y|x) - log π_ref(y|x)``::

        L = E[λ_y - v(x, y)],  v = λ_D·σ(β(r - z0)) if y desirable, λ_U·σ(β(z0 - r)) if not,
        z0 = KL(π(y'|x) || π_ref(y'|x))

    z0 is estimated as in the paper and TRL: the batch mean of ``policy_kl - ref_kl`` over
    *mismatched* prompt/completion pairs, clamped at 0 and detached (no gradient flows
    through it). Departures from TRL: z0 is the mean over this process's batch only (TRL
    all-gathers it across devices); a mismatched row's completion always comes from a row
    with another prompt (TRL shifts by one row, which pairs a prompt with its own completion
    wherever neighbouring rows share a prompt; see
    :func:`~dpo_lit.data.collate.mismatched_partners`); and a batch whose rows all share one
    prompt has no mismatched pair, so its z0 is 0. The scalar loss is ``sum(λ_y·l) / B`` over all B
    examples (TRL's mean of the concatenated weighted losses), and ``losses`` holds the
    weighted per-example terms so that ``loss == losses.mean()``. ``chosen_rewards`` /
    ``rejected_rewards`` are ``β·r`` of the desirable / undesirable examples (either may be
    empty); margins and accuracies are None; ``metrics["kto_z0"]`` is z0 (TRL logs it as "kl"; it is an estimate from mismatched dataset pairs, not the sampled KL(π‖π_ref) that monitoring reports).

    Args:
        beta: Inverse temperature β of the value function. Must be > 0.
        desirable_weight: λ_D, weight of desirable examples' losses.
        undesirable_weight: λ_U, weight of undesirable examples' losses.
    """

    needs_reference = True
    data_mode = "unpaired"

    def __init__(
        self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
    ) -> None:
        super().__init__()
        check_beta("KTOLoss", beta)
        if desirable_weight < 0 or undesirable_weight < 0:
            raise ConfigError(
                f"{KEY}desirable_weight/undesirable_weight: KTOLoss's weights must be >= 0, got "
                f"{desirable_weight}, {undesirable_weight}"
            )
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight

    def logps_from_rows(
        self, policy_logps: Tensor, ref_logps: Tensor | None, tokens: Tensor, batch: dict[str, Any]
    ) -> UnpairedLogps:
        """Split 2B rows: 0..B-1 matched prompt+completion, B..2B-1 mismatched (for z0).

        ``batch["label"]`` is a (B,) bool tensor, True for desirable completions.
        """
        policy, policy_kl = split_halves(policy_logps)
        ref, ref_kl = split_halves(ref_logps) if ref_logps is not None else (None, None)
        return UnpairedLogps(policy, ref, split_halves(tokens)[0], batch["label"].bool(), policy_kl, ref_kl)

    def forward(self, logps: UnpairedLogps) -> LossOutput:
        if logps.ref is None or logps.ref_kl is None:
            raise ValueError(reference_error(type(self).__name__))
        z0 = kto_reference_point(logps.policy_kl, logps.ref_kl)
        label = logps.label.bool()
        losses = kto_loss(
            logps.policy, logps.ref, label, z0, self.beta, self.desirable_weight, self.undesirable_weight
        )
        rewards = (self.beta * (logps.policy - logps.ref)).detach()
        return LossOutput(
            loss=losses.mean(),
            losses=losses,
            chosen_rewards=rewards[label],
            rejected_rewards=rewards[~label],
            metrics={"kto_z0": z0},
        )
