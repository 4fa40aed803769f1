"""RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
from Human Feedback in LLMs"): k completions per prompt, each one's advantage its reward minus the
mean reward of the other k - 1 (:func:`~dpo_lit.rlhf.objectives.rloo_advantages`), and a
sequence-level REINFORCE update (:func:`~dpo_lit.rlhf.objectives.reinforce_loss`): no value model,
no clipping.

    dpo-lit fit --config configs/rloo/tiny.yaml

The KL to the reference is in the reward, as the paper has it (``kl_in_reward``: each rollout's
score minus ``kl_coef`` × its sequence log-ratio log π/π_ref, before the baseline), or a loss term
(``kl_coef`` × the mean per-token k3 estimate). Rollouts, scoring, the reference and validation
are :class:`~dpo_lit.rlhf.online.OnlineModule`'s.
"""

from __future__ import annotations

from typing import Any

from dpo_lit.errors import ConfigError
from dpo_lit.models import evaluating
from dpo_lit.rlhf.objectives import k3_kl, masked_mean, reinforce_loss, rloo_advantages
from dpo_lit.rlhf.online import OnlineModule


class RLOOModule(OnlineModule):
    """REINFORCE with a leave-one-out baseline over ``samples_per_prompt`` (k ≥ 2) rollouts per prompt.

    Args:
        model_name: the policy (usually the SFT model); the reference is the same weights, frozen.
        samples_per_prompt: k, rollouts per prompt (at least 2: each is baselined by the others).
        kl_coef: weight of the KL to the reference (in the reward, or in the loss).
        kl_in_reward: subtract ``kl_coef`` × the rollout's log π/π_ref from its score (True, the
            paper's); else add ``kl_coef`` × the per-token k3 KL to the loss.
        epochs: passes over each batch of rollouts (1: on-policy REINFORCE).
        minibatch_size: rollouts per optimizer update (None: all of the batch's, one update).
        **kwargs: the rollouts' and the trained model's settings (:class:`~dpo_lit.rlhf.online.OnlineModule`).
    """

    def __init__(
        self,
        model_name: str,
        samples_per_prompt: int = 4,
        kl_coef: float = 0.05,
        kl_in_reward: bool = True,
        epochs: int = 1,
        minibatch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name, samples_per_prompt=samples_per_prompt, **kwargs)
        if samples_per_prompt < 2:
            raise ConfigError(f"model.samples_per_prompt: RLOO baselines each rollout by the others, so it needs >= 2, "
                              f"got {samples_per_prompt}")  # fmt: skip
        self.check(positive={"epochs": epochs, "minibatch_size": minibatch_size}, non_negative={"kl_coef": kl_coef})

    def training_step(self, batch: dict, batch_idx: int) -> None:
        h = self.hparams
        r = self.rollouts(batch)
        with evaluating(self.policy):
            old = self.policy_outputs(r)
        ref_logps = self.reference_logps(r)
        sequence_kl = ((old.logps - ref_logps) * r.response).sum(-1)  # (N,) log π/π_ref of each rollout
        rewards = r.penalised - h.kl_coef * sequence_kl if h.kl_in_reward else r.penalised
        advantages = rloo_advantages(rewards, h.samples_per_prompt)
        lr = self.optimizers().param_groups[0]["lr"]
        losses = []
        for idx in self.minibatches(len(r.ids), h.minibatch_size or len(r.ids), h.epochs):
            new = self.policy_outputs(r, idx)
            loss = reinforce_loss(new.logps, advantages[idx], r.response[idx])
            if not h.kl_in_reward and h.kl_coef:
                loss = loss + h.kl_coef * masked_mean(k3_kl(new.logps, ref_logps[idx]), r.response[idx])
            self.update(loss)
            losses.append(loss.detach())
        self.log_train({
            "reward": r.scores.mean(), "kl": sequence_kl.mean(), "loss": sum(losses) / len(losses),
            "advantage_abs": advantages.abs().mean(), "response_length": r.response.sum(-1).mean(),
            "finished": r.finished.float().mean(), "lr": lr,
        }, len(r.samples))  # fmt: skip
