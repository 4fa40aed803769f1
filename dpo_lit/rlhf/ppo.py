"""PPO with a KL penalty to the initial policy (Ziegler et al. 2019; Ouyang et al. 2022), an
:class:`~dpo_lit.rlhf.online.OnlineModule` (rollouts, scores, reference, measurement shared with
RLOO, GRPO and online DPO).

    dpo-lit fit --config configs/ppo/tiny.yaml

Each training batch is a batch of prompts (:class:`~dpo_lit.sampling.predict.PromptDataModule`)
and one PPO iteration:

1. **rollouts**: the policy samples ``samples_per_prompt`` completions of each prompt with the
   project's sampler (token ids kept as sampled); any :class:`~dpo_lit.rewards.Reward` scores
   them (a rule, VADER, a classifier, :class:`~dpo_lit.rewards.RewardModel`);
2. **one no-grad forward** of the policy gives each response token's log-prob and value, one of
   the reference its log-prob; the per-token reward is ``-kl_coef · (log π - log π_ref)`` plus the
   score on the last token (minus ``missing_eos_penalty`` when the answer was cut);
3. **GAE** gives advantages (whitened) and returns;
4. **``ppo_epochs`` passes** over shuffled minibatches of the rollouts, each an optimizer update of
   the clipped surrogate plus ``vf_coef`` × the clipped value loss;
5. the KL coefficient adapts towards ``target_kl`` when one is set.

The value function is a linear head on the policy's last hidden state (a shared trunk), not a
second model: on a CPU a separate value model would double the forward and backward passes of
every update and the weights in memory; the price is that value gradients also move the policy's
trunk (LoRA weights under LoRA), which ``vf_coef`` keeps small. The reference is the policy with
its adapter off under LoRA, else a frozen copy — :mod:`dpo_lit.reference`'s objects, so the
SampledKL, SampleTable and CapabilityEval callbacks work unchanged.

``trainer.max_steps`` counts optimizer updates, ``ppo_epochs · ceil(rollouts / minibatch_size)``
per batch of prompts; the learning-rate schedule is sized in the updates the run makes, whether
``max_steps`` or ``max_epochs`` ends it (:mod:`dpo_lit.rlhf.schedule`), and steps after each one.

With ``temperature`` T ≠ 1 the rollouts are drawn from softmax(logits / T), and every log-prob of
the iteration is taken from that same tempered distribution — the policy's old and new ones (the
ratio of the surrogate), the reference's (the per-token KL penalty and ``train/kl``) and the
entropy — as TRL's PPO did: the surrogate is then that of the distribution sampled from, and
``train/kl`` (and ``val/kl_rollouts``, on held-out prompts) the KL between the tempered policy and
the tempered reference.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from dpo_lit.errors import ConfigError
from dpo_lit.models import evaluating
from dpo_lit.rlhf.objectives import (
    KLController,
    gae,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from dpo_lit.rlhf.online import OnlineModule, TokenOutputs, token_outputs
from dpo_lit.rlhf.schedule import updates_per_batch

__all__ = ["PPOModule", "TokenOutputs", "token_outputs"]


class PPOModule(OnlineModule):
    """RLHF's last stage: PPO on a reward, with a per-token KL penalty to the initial policy.

    Args:
        model_name: the policy (usually the SFT model): Hub name, local folder, ``.gguf`` or alias;
            the reference is the same weights, frozen.
        kl_coef: initial coefficient of the per-token KL penalty.
        target_kl: sequence-level KL the coefficient adapts towards (None: fixed coefficient).
        kl_horizon: sequences over which the adaptive coefficient makes a full correction.
        ppo_epochs: passes over each batch of rollouts.
        minibatch_size: rollouts per optimizer update.
        clip_range: ε of the clipped surrogate.
        clip_range_value: how far a value may move from the rollout's before its loss is clipped.
        vf_coef: weight of the value loss.
        gamma: discount over response tokens.
        lam: GAE's λ.
        whiten_advantages: normalise advantages over each batch of rollouts.
        **kwargs: the rollouts' and the trained model's settings (:class:`~dpo_lit.rlhf.online.OnlineModule`:
            ``reward``, ``samples_per_prompt``, ``max_new_tokens``, ``temperature``, ``missing_eos_penalty``,
            ``max_grad_norm``, ``scheduler``, ``generation_batch_size``, ``seed``; ``lora``, ``optimizer``, ...).
    """

    def __init__(
        self,
        model_name: str,
        kl_coef: float = 0.05,
        target_kl: float | None = None,
        kl_horizon: int = 10000,
        ppo_epochs: int = 2,
        minibatch_size: int = 8,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        vf_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name, **kwargs)
        self.check(positive={"ppo_epochs": ppo_epochs, "minibatch_size": minibatch_size}, non_negative={"kl_coef": kl_coef})
        if target_kl is not None and target_kl <= 0:
            raise ConfigError(f"model.target_kl: must be > 0, got {target_kl}")
        self.kl = KLController(kl_coef, target_kl, kl_horizon)
        self.value_head = nn.Linear(self.policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: the first advantages are the rewards
        nn.init.zeros_(self.value_head.bias)

    # ---- the PPO iteration -------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        h = self.hparams
        r = self.rollouts(batch)
        with evaluating(self.policy):
            old = self.policy_outputs(r, value_head=self.value_head, entropy=True)
        ref_logps = self.reference_logps(r)
        kl_coef = self.kl.coef
        rewards = token_rewards(r.penalised, old.logps, ref_logps, r.response, kl_coef)
        advantages, returns = gae(rewards, old.values, r.response, h.gamma, h.lam)
        if h.whiten_advantages:
            advantages = whiten(advantages, r.response)
        lr = self.optimizers().param_groups[0]["lr"]  # the LR of this iteration's first update
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        for idx in self.minibatches(len(r.ids), h.minibatch_size, h.ppo_epochs):
            new = self.policy_outputs(r, idx, value_head=self.value_head)
            response = r.response[idx]
            pg = policy_loss(new.logps, old.logps[idx], advantages[idx], response, h.clip_range)
            vf = value_loss(new.values, old.values[idx], returns[idx], response, h.clip_range_value)
            self.update(pg.loss + h.vf_coef * vf)
            for name, value in (("policy_loss", pg.loss), ("value_loss", vf), ("clipfrac", pg.clipfrac),
                                ("approx_kl", pg.approx_kl)):  # fmt: skip
                stats[name].append(value.detach())
        sequence_kl = ((old.logps - ref_logps) * r.response).sum(-1)  # (B,)
        self.kl.update(sequence_kl.mean().item(), len(r.samples))
        self.log_train({
            "reward": r.scores.mean(), "kl": sequence_kl.mean(), "kl_coef": kl_coef,
            "non_score_reward": (rewards.sum(-1) - r.penalised).mean(),
            "entropy": masked_mean(old.entropy, r.response), "response_length": r.response.sum(-1).mean(),
            "finished": r.finished.float().mean(), "lr": lr,
            **{name: torch.stack(values).mean() for name, values in stats.items()},
        }, len(r.samples))  # fmt: skip

    def updates_per_batch(self, prompts: int) -> int:
        h = self.hparams
        return updates_per_batch(prompts, h.samples_per_prompt, h.minibatch_size, h.ppo_epochs)

    # ---- hooks -------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_coef"] = self.kl.coef

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.kl.coef = checkpoint.get("kl_coef", self.kl.coef)

    def shard_models(self, mesh) -> None:
        from torch.distributed.fsdp import fully_shard

        super().shard_models(mesh)
        fully_shard(self.value_head, mesh=mesh)

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad] + list(self.value_head.parameters())
