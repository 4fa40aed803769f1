"""GRPO (Shao et al. 2024, "DeepSeekMath"): k completions per prompt, advantages normalised within
each prompt's group (:func:`~dpo_lit.rlhf.objectives.group_advantages`), PPO's clipped ratio per
token and the KL to the reference as a loss term (:func:`~dpo_lit.rlhf.objectives.grpo_loss`); no
value model. The Dr. GRPO variant (Liu et al. 2025) is ``scale_rewards: false`` with
``loss_normalization: constant``: no division by the group's standard deviation or by each
completion's length, the two biases that paper removes.

    dpo-lit fit --config configs/grpo/tiny.yaml

Rollouts, scoring, the reference and validation are :class:`~dpo_lit.rlhf.online.OnlineModule`'s.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

import torch

from dpo_lit.errors import ConfigError
from dpo_lit.models import evaluating
from dpo_lit.rlhf.objectives import group_advantages, grpo_loss
from dpo_lit.rlhf.online import OnlineModule


class GRPOModule(OnlineModule):
    """Group-relative policy optimisation over ``samples_per_prompt`` (k ≥ 2) rollouts per prompt.

    Args:
        model_name: the policy (usually the SFT model); the reference is the same weights, frozen.
        samples_per_prompt: k, the group of rollouts of each prompt (at least 2).
        kl_coef: β, the weight of the per-token k3 KL to the reference in the loss (0: no
            reference forward at all).
        clip_range: ε of the clipped ratio.
        epochs: passes over each batch of rollouts (GRPO's μ; 1: the ratio stays 1 and only the
            advantage-weighted gradient remains).
        minibatch_size: rollouts per optimizer update (None: all of the batch's, one update per pass).
        scale_rewards: divide each group's centred scores by its standard deviation (GRPO); False
            for Dr. GRPO.
        loss_normalization: ``sequence`` (each rollout's mean over its tokens, then the mean over
            rollouts: GRPO), ``token`` (the mean over all the batch's tokens) or ``constant`` (the
            sum over tokens divided by rollouts × ``max_new_tokens``: Dr. GRPO).
        **kwargs: the rollouts' and the trained model's settings (:class:`~dpo_lit.rlhf.online.OnlineModule`).
    """

    def __init__(
        self,
        model_name: str,
        samples_per_prompt: int = 4,
        kl_coef: float = 0.04,
        clip_range: float = 0.2,
        epochs: int = 1,
        minibatch_size: int | None = None,
        scale_rewards: bool = True,
        loss_normalization: Literal["sequence", "token", "constant"] = "sequence",
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name, samples_per_prompt=samples_per_prompt, **kwargs)
        if samples_per_prompt < 2:
            raise ConfigError(f"model.samples_per_prompt: GRPO normalises within each prompt's group, so it needs "
                              f">= 2, got {samples_per_prompt}")  # fmt: skip
        self.check(positive={"epochs": epochs, "minibatch_size": minibatch_size}, non_negative={"kl_coef": kl_coef})

    def training_step(self, batch: dict, batch_idx: int) -> None:
        h = self.hparams
        r = self.rollouts(batch)
        with evaluating(self.policy):
            old = self.policy_outputs(r)
        ref_logps = self.reference_logps(r) if h.kl_coef else None
        advantages = group_advantages(r.penalised, h.samples_per_prompt, scale=h.scale_rewards)
        lr = self.optimizers().param_groups[0]["lr"]
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        for idx in self.minibatches(len(r.ids), h.minibatch_size or len(r.ids), h.epochs):
            new = self.policy_outputs(r, idx)
            out = grpo_loss(
                new.logps, old.logps[idx], None if ref_logps is None else ref_logps[idx], advantages[idx],
                r.response[idx], h.clip_range, h.kl_coef, h.loss_normalization, h.max_new_tokens,
            )  # fmt: skip
            self.update(out.loss)
            for name, value in (("loss", out.loss), ("clipfrac", out.clipfrac), ("token_kl", out.kl)):
                stats[name].append(value.detach())
        logged = {
            "reward": r.scores.mean(), "advantage_abs": advantages.abs().mean(),
            "response_length": r.response.sum(-1).mean(), "finished": r.finished.float().mean(), "lr": lr,
            **{name: torch.stack(values).mean() for name, values in stats.items()},
        }  # fmt: skip
        if ref_logps is not None:
            logged["kl"] = ((old.logps - ref_logps) * r.response).sum(-1).mean()
        self.log_train(logged, len(r.samples))
