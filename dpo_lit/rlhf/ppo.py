"""PPO with a KL penalty to the initial policy (Ziegler et al. 2019; Ouyang et al. 2022), as a
LightningModule with manual optimisation.

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
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from jsonargparse import lazy_instance
from torch import Tensor, nn

from dpo_lit.data.collate import pad_rows
from dpo_lit.errors import ConfigError
from dpo_lit.logps import completion_states, head_outputs
from dpo_lit.models import evaluating
from dpo_lit.policy import PolicyModule
from dpo_lit.reference import SHORTCUTS
from dpo_lit.rewards import Reward, VaderSentiment
from dpo_lit.rlhf.objectives import (
    KLController,
    gae,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from dpo_lit.rlhf.schedule import epoch_batch_sizes, planned_updates, updates_per_batch
from dpo_lit.sampling.measure import MeasureSpec, measure, reference_model, score_samples
from dpo_lit.sampling.sample import Sample, sample
from dpo_lit.sharding import in_forward, shard


@dataclass
class TokenOutputs:
    """Per response token, (B, T) each: log-probs, values (zeros without a value head), entropies."""

    logps: Tensor
    values: Tensor
    entropy: Tensor


def to_grid(values: Tensor, rows: Tensor, cols: Tensor, shape: tuple[int, int]) -> Tensor:
    """Scatter per-token values (M,) into a zero (B, T) grid at ``[rows, cols]``."""
    grid = values.new_zeros(shape)
    grid[rows, cols] = values
    return grid


def _head(model: nn.Module, ids: Tensor, mask: Tensor, completion_mask: Tensor, temperature: float, entropy: bool):
    states, targets, rows = completion_states(model, ids, mask, completion_mask)  # (M, H), (M,), (M,)
    return states, head_outputs(model, states, targets, temperature=temperature, stats=("entropy",) if entropy else ()), rows


def token_outputs(
    model: nn.Module, ids: Tensor, mask: Tensor, completion_mask: Tensor, width: int,
    value_head: nn.Module | None = None, entropy: bool = False, temperature: float = 1.0,
) -> TokenOutputs:
    """One forward of ``model`` over right-padded rollouts: each response token's log-prob, the
    value of the state before it (``value_head`` on the last hidden state) and the entropy of the
    distribution it was drawn from (no gradient), laid out (B, width); log-probs and entropy are
    those of softmax(logits / ``temperature``), the distribution rollouts at that temperature
    are drawn from."""
    states, head, rows = in_forward(model, _head, ids, mask, completion_mask, temperature, entropy)
    target_mask = completion_mask[:, 1:]
    cols = target_mask.cumsum(-1)[target_mask] - 1  # (M,) position within the response
    shape = (len(ids), width)
    logps = to_grid(head.logps, rows, cols, shape)
    values = torch.zeros(shape, device=ids.device)
    if value_head is not None:
        values = to_grid(value_head(states).squeeze(-1).float(), rows, cols, shape)
    entropies = torch.zeros(shape, device=ids.device) if head.entropy is None else to_grid(head.entropy, rows, cols, shape)
    return TokenOutputs(logps, values, entropies)


class PPOModule(PolicyModule):
    """RLHF's last stage: PPO on a reward, with a per-token KL penalty to the initial policy.

    Args:
        model_name: the policy (usually the SFT model): Hub name, local folder, ``.gguf`` or alias;
            the reference is the same weights, frozen.
        reward: scores the rollouts (``class_path``: VaderSentiment, RewardModel, LengthReward, ...).
        samples_per_prompt: rollouts per prompt of a batch.
        max_new_tokens: bound on a rollout's tokens (a cut rollout keeps no EOS).
        temperature: sampling temperature of the rollouts (1: the policy itself); the policy's
            and the reference's log-probs are taken at the same temperature.
        missing_eos_penalty: subtracted from the score of rollouts cut by ``max_new_tokens``.
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
        max_grad_norm: clip the gradient's norm (None: no clipping).
        scheduler: learning-rate schedule by its ``transformers`` name, sized in the optimizer
            updates of the run and stepped after each.
        warmup_ratio: fraction of the schedule spent warming up.
        generation_batch_size: rows per ``generate`` call.
        seed: seed of the rollouts' sampling (each batch adds the optimizer step count).
        **kwargs: the trained model's settings (:class:`~dpo_lit.policy.PolicyModule`: ``lora``, with
            which the reference is the policy with the adapter off, ``optimizer``, ``dtype``, ...).
    """

    hparams_ignore = ("reward",)  # objects: rebuilt from the config, their state in the checkpoint

    def __init__(
        self,
        model_name: str,
        reward: Reward = lazy_instance(VaderSentiment),
        samples_per_prompt: int = 2,
        max_new_tokens: int = 48,
        temperature: float = 1.0,
        missing_eos_penalty: float | None = None,
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
        max_grad_norm: float | None = 1.0,
        scheduler: str = "constant",
        warmup_ratio: float = 0.0,
        generation_batch_size: int = 16,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name, scheduler=scheduler, warmup_ratio=warmup_ratio, **kwargs)
        if temperature <= 0:
            raise ConfigError(f"model.temperature: PPO samples its rollouts, so it must be > 0, got {temperature}")
        for key, value in (("kl_coef", kl_coef), ("samples_per_prompt", samples_per_prompt),
                           ("ppo_epochs", ppo_epochs), ("minibatch_size", minibatch_size)):  # fmt: skip
            if value < 0 or (value == 0 and key != "kl_coef"):
                raise ConfigError(f"model.{key}: must be {'>= 0' if key == 'kl_coef' else '> 0'}, got {value}")
        if target_kl is not None and target_kl <= 0:
            raise ConfigError(f"model.target_kl: must be > 0, got {target_kl}")
        self.automatic_optimization = False
        self.reward = reward
        self.kl = KLController(kl_coef, target_kl, kl_horizon)
        self.policy = self.load_model()
        self.reference = SHORTCUTS["copy" if self.lora is None else "adapter"]()
        self.reference.setup(self.policy, lora=self.lora is not None, paired=True, chunk=None)
        self.policy = self.trainable(self.policy)
        self.value_head = nn.Linear(self.policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: the first advantages are the rewards
        nn.init.zeros_(self.value_head.bias)

    # ---- rollouts ----------------------------------------------------------------------------

    def _rollouts(self, batch: dict, seed: int) -> tuple[list[Sample], Tensor]:
        h = self.hparams
        samples = sample(
            self.policy, self.tokenizer, batch["prompt_ids"], h.samples_per_prompt, h.max_new_tokens,
            temperature=h.temperature, batch_size=h.generation_batch_size, seed=seed,
        )
        return samples, score_samples(self.reward, batch["prompts"], samples).to(self.device)

    def _pad(self, samples: list[Sample]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Right-padded rollouts: ids, attention mask, completion mask, response mask (B, T_resp)."""
        ids, mask, completion_mask = pad_rows(
            [s.prompt_ids + s.completion_ids for s in samples], self.tokenizer.pad_token_id,
            first_scored=[len(s.prompt_ids) for s in samples],
        )
        lengths = torch.tensor([len(s.completion_ids) for s in samples])
        response_mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).float()
        return ids.to(self.device), mask.to(self.device), completion_mask.to(self.device), response_mask.to(self.device)

    # ---- the PPO iteration -------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        h = self.hparams
        samples, scores = self._rollouts(batch, seed=h.seed + self.trainer.global_step)
        finished = torch.tensor([s.finished for s in samples], device=self.device)
        penalised = scores - (h.missing_eos_penalty or 0.0) * (~finished).float()
        ids, mask, completion_mask, response = self._pad(samples)
        width = response.shape[1]
        with evaluating(self.policy):
            old = token_outputs(
                self.policy, ids, mask, completion_mask, width, self.value_head, entropy=True, temperature=h.temperature
            )
            ref_logps = self._reference_logps(ids, mask, completion_mask, width)
        kl_coef = self.kl.coef
        rewards = token_rewards(penalised, old.logps, ref_logps, response, kl_coef)
        advantages, returns = gae(rewards, old.values, response, h.gamma, h.lam)
        if h.whiten_advantages:
            advantages = whiten(advantages, response)
        lr = self.optimizers().param_groups[0]["lr"]  # the LR of this iteration's first update
        stats = self._update(ids, mask, completion_mask, response, old, advantages, returns)
        sequence_kl = ((old.logps - ref_logps) * response).sum(-1)  # (B,)
        self.kl.update(sequence_kl.mean().item(), len(samples))
        logged = {
            "reward": scores.mean(), "kl": sequence_kl.mean(), "kl_coef": kl_coef,
            "non_score_reward": (rewards.sum(-1) - penalised).mean(),
            "entropy": masked_mean(old.entropy, response), "response_length": response.sum(-1).mean(),
            "finished": finished.float().mean(), "lr": lr,
            **{name: torch.stack(values).mean() for name, values in stats.items()},
        }
        for name, value in logged.items():
            self.log(f"train/{name}", value, batch_size=len(samples), prog_bar=name in ("reward", "kl"))

    def _update(self, ids, mask, completion_mask, response, old: TokenOutputs, advantages, returns) -> dict:
        """``ppo_epochs`` passes of minibatch updates; the losses and diagnostics of each update."""
        h = self.hparams
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        stats: dict[str, list[Tensor]] = defaultdict(list)
        for _ in range(h.ppo_epochs):
            order = torch.randperm(len(ids), device=self.device)
            for start in range(0, len(ids), h.minibatch_size):
                idx = order[start : start + h.minibatch_size]
                length = int(mask[idx].sum(-1).max())  # right padding: columns beyond are all padding
                new = token_outputs(
                    self.policy, ids[idx, :length], mask[idx, :length], completion_mask[idx, :length],
                    response.shape[1], self.value_head, temperature=h.temperature,
                )
                pg = policy_loss(new.logps, old.logps[idx], advantages[idx], response[idx], h.clip_range)
                vf = value_loss(new.values, old.values[idx], returns[idx], response[idx], h.clip_range_value)
                optimizer.zero_grad()
                self.manual_backward(pg.loss + h.vf_coef * vf)
                if h.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=h.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                if scheduler is not None:  # sized in the updates of the run: one step per update
                    scheduler.step()
                for name, value in (("policy_loss", pg.loss), ("value_loss", vf), ("clipfrac", pg.clipfrac),
                                    ("approx_kl", pg.approx_kl)):  # fmt: skip
                    stats[name].append(value.detach())
        return stats

    # ---- validation: the policy's rollouts on held-out prompts ---------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        h = self.hparams
        spec = MeasureSpec(
            h.samples_per_prompt, h.max_new_tokens, h.generation_batch_size, h.seed + 10_000 + batch_idx, h.temperature
        )
        # at temperature T the KL between the tempered policy and the tempered reference, the
        # distributions the rollouts are drawn from and scored under (train/kl's, on held-out prompts)
        found = reference_model(self)
        result = measure(self.policy, self.tokenizer, batch["prompts"], batch["prompt_ids"], spec, self.reward, *found)
        size = len(result.samples)
        self.log("val/reward", float(result.rewards.mean()), batch_size=size, prog_bar=True)
        self.log("val/kl_rollouts", result.kl.mean, batch_size=size)
        self.log("val/response_length", sum(len(s.completion_ids) for s in result.raw) / size, batch_size=size)

    def _reference_logps(self, ids: Tensor, mask: Tensor, completion_mask: Tensor, width: int) -> Tensor:
        """The reference's log-prob of each response token, (B, width), at the rollouts'
        temperature, as :func:`token_outputs` takes the policy's."""
        reference, context = self.reference.model(self.policy)
        with context():
            outputs = token_outputs(reference, ids, mask, completion_mask, width, temperature=self.hparams.temperature)
        return outputs.logps

    # ---- hooks -------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        trainer = self.trainer
        self.reference.prepare(self.policy, {}, self.device, trainer.precision_plugin.forward_context, str(trainer.precision))

    def on_validation_start(self) -> None:
        self.on_fit_start()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_coef"] = self.kl.coef
        checkpoint["reference"] = self.reference.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.kl.coef = checkpoint.get("kl_coef", self.kl.coef)
        self.reference.load_state_dict(checkpoint.get("reference", {}))

    def shard_models(self, mesh) -> None:
        from torch.distributed.fsdp import fully_shard

        super().shard_models(mesh)
        fully_shard(self.value_head, mesh=mesh)
        self.reference.shard(lambda model: shard(model, mesh))

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad] + list(self.value_head.parameters())

    def configure_optimizers(self) -> dict:
        """The optimizer and the schedule, sized in the updates the run makes (:mod:`~dpo_lit.rlhf.schedule`)."""
        h, trainer = self.hparams, self.trainer
        updates = partial(
            updates_per_batch, samples_per_prompt=h.samples_per_prompt, minibatch_size=h.minibatch_size,
            ppo_epochs=h.ppo_epochs,
        )
        sizes = epoch_batch_sizes(trainer)
        # None (an iterable dataset or an unbounded run): Lightning's estimate (max_steps)
        return super().configure_optimizers(
            None if sizes is None else planned_updates(sizes, updates, trainer.max_epochs, trainer.max_steps)
        )
