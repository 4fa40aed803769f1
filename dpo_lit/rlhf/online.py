"""What every online method shares: rollouts from the policy, their scores, the reference's
log-probs of them, the optimizer update, the held-out measurement and the checkpoint hooks.

:class:`OnlineModule` is the base of :class:`~dpo_lit.rlhf.PPOModule`,
:class:`~dpo_lit.rlhf.RLOOModule`, :class:`~dpo_lit.rlhf.GRPOModule` and
:class:`~dpo_lit.rlhf.OnlineDPOModule`; each of them only turns a batch of rollouts into its
updates (``training_step``). Each training batch is a batch of prompts
(:class:`~dpo_lit.sampling.predict.PromptDataModule`):

1. **rollouts** (:meth:`OnlineModule.rollouts`): the policy samples ``samples_per_prompt``
   completions of each prompt (prompt-major: a prompt's samples are consecutive) with the project's
   sampler, seeded by ``seed`` plus the optimizer step count; any :class:`~dpo_lit.rewards.Reward`
   scores them (a rule, VADER, a classifier, :class:`~dpo_lit.rewards.RewardModel`), minus
   ``missing_eos_penalty`` for a completion cut at ``max_new_tokens``;
2. **token outputs** (:func:`token_outputs`): one forward of the policy or the reference over the
   right-padded rollouts gives each response token's log-prob (at the sampling temperature), and
   with a value head its value;
3. the subclass's loss, then :meth:`OnlineModule.update`: backward, gradient clipping, optimizer
   and schedule step. ``trainer.max_steps`` counts these updates; the schedule is sized in the
   updates the run makes (:meth:`OnlineModule.updates_per_batch`, :mod:`dpo_lit.rlhf.schedule`).

The reference is the policy with its adapter off under LoRA, else a frozen copy
(:mod:`dpo_lit.reference`), so the monitoring callbacks work unchanged; validation measures the
policy's rollouts on held-out prompts with :func:`~dpo_lit.sampling.measure.measure`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
from dpo_lit.rlhf.schedule import epoch_batch_sizes, planned_updates
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


@dataclass
class Rollouts:
    """A batch of rollouts, prompt-major: the samples, their scores (N,) as the reward gave them and
    ``penalised`` (minus ``missing_eos_penalty`` where cut), whether each ended with an EOS, and the
    right-padded rows: ids, attention and completion masks (N, T), response mask (N, T_resp)."""

    samples: list[Sample]
    scores: Tensor
    penalised: Tensor
    finished: Tensor
    ids: Tensor
    mask: Tensor
    completion_mask: Tensor
    response: Tensor

    @property
    def width(self) -> int:
        return self.response.shape[1]


class OnlineModule(PolicyModule):
    """The base of the online methods (the module docstring says what it does for them).

    Args:
        model_name: the policy (usually the SFT model): Hub name, local folder, ``.gguf`` or alias;
            the reference is the same weights, frozen.
        reward: scores the rollouts (``class_path``: VaderSentiment, RewardModel, LengthReward, ...).
        samples_per_prompt: rollouts per prompt of a batch.
        max_new_tokens: bound on a rollout's tokens (a cut rollout keeps no EOS).
        temperature: sampling temperature of the rollouts (1: the policy itself); the policy's
            and the reference's log-probs are taken at the same temperature.
        missing_eos_penalty: subtracted from the score of rollouts cut by ``max_new_tokens``.
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
        max_grad_norm: float | None = 1.0,
        scheduler: str = "constant",
        warmup_ratio: float = 0.0,
        generation_batch_size: int = 16,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name, scheduler=scheduler, warmup_ratio=warmup_ratio, **kwargs)
        name = type(self).__name__.removesuffix("Module")
        if temperature <= 0:
            raise ConfigError(f"model.temperature: {name} samples its rollouts, so it must be > 0, got {temperature}")
        self.check(positive={"samples_per_prompt": samples_per_prompt})
        self.automatic_optimization = False
        self.reward = reward
        self.policy = self.load_model()
        self.reference = SHORTCUTS["copy" if self.lora is None else "adapter"]()
        self.reference.setup(self.policy, lora=self.lora is not None, paired=True, chunk=None)
        self.policy = self.trainable(self.policy)
        self.sampled = 0  # completions sampled by the training rollouts (checkpointed)

    @staticmethod
    def check(positive: dict[str, float | None] = {}, non_negative: dict[str, float | None] = {}) -> None:  # noqa: B006
        """A ConfigError naming the first setting that is not > 0 (``positive``) or >= 0
        (``non_negative``); None passes (a setting left unset)."""
        for key, value in positive.items():
            if value is not None and value <= 0:
                raise ConfigError(f"model.{key}: must be > 0, got {value}")
        for key, value in non_negative.items():
            if value is not None and value < 0:
                raise ConfigError(f"model.{key}: must be >= 0, got {value}")

    # ---- rollouts ----------------------------------------------------------------------------

    def rollouts(self, batch: dict, seed: int | None = None) -> Rollouts:
        """``samples_per_prompt`` scored completions of each prompt of ``batch``, sampled with ``seed``
        (None: ``seed`` plus the optimizer steps taken)."""
        h = self.hparams
        samples = sample(
            self.policy, self.tokenizer, batch["prompt_ids"], h.samples_per_prompt, h.max_new_tokens,
            temperature=h.temperature, batch_size=h.generation_batch_size,
            seed=h.seed + self.trainer.global_step if seed is None else seed,
        )
        self.sampled += len(samples)
        scores = score_samples(self.reward, batch["prompts"], samples).to(self.device)
        finished = torch.tensor([s.finished for s in samples], device=self.device)
        penalised = scores - (h.missing_eos_penalty or 0.0) * (~finished).float()
        ids, mask, completion_mask = pad_rows(
            [s.prompt_ids + s.completion_ids for s in samples], self.tokenizer.pad_token_id,
            first_scored=[len(s.prompt_ids) for s in samples],
        )
        lengths = torch.tensor([len(s.completion_ids) for s in samples])
        response = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).float()
        device = self.device
        return Rollouts(samples, scores, penalised, finished, ids.to(device), mask.to(device),
                        completion_mask.to(device), response.to(device))  # fmt: skip

    def policy_outputs(self, r: Rollouts, rows: Tensor | None = None, value_head: nn.Module | None = None,
                       entropy: bool = False) -> TokenOutputs:  # fmt: skip
        """The policy's token outputs of the rollouts (of ``rows`` only, when given), with gradients
        unless called under ``no_grad``."""
        ids, mask, completion_mask = r.ids, r.mask, r.completion_mask
        if rows is not None:
            length = int(mask[rows].sum(-1).max())  # right padding: columns beyond are all padding
            ids, mask, completion_mask = ids[rows, :length], mask[rows, :length], completion_mask[rows, :length]
        return token_outputs(self.policy, ids, mask, completion_mask, r.width, value_head, entropy,
                             temperature=self.hparams.temperature)  # fmt: skip

    def reference_logps(self, r: Rollouts) -> Tensor:
        """The reference's log-prob of each response token, (N, width), at the rollouts' temperature."""
        reference, context = self.reference.model(self.policy)
        with torch.no_grad(), evaluating(self.policy), context():
            outputs = token_outputs(reference, r.ids, r.mask, r.completion_mask, r.width,
                                    temperature=self.hparams.temperature)  # fmt: skip
        return outputs.logps

    # ---- updates -----------------------------------------------------------------------------

    def update(self, loss: Tensor) -> None:
        """One optimizer update on ``loss``: backward, gradient clipping, optimizer and schedule step."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.hparams.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        if scheduler is not None:  # sized in the updates of the run: one step per update
            scheduler.step()

    def minibatches(self, n: int, size: int, epochs: int = 1):
        """``epochs`` passes over ``n`` rollouts in shuffled minibatches of ``size`` (index tensors)."""
        for _ in range(epochs):
            order = torch.randperm(n, device=self.device)
            for start in range(0, n, size):
                yield order[start : start + size]

    def updates_per_batch(self, prompts: int) -> int:
        """Optimizer updates of one batch of ``prompts`` (sizes the schedule): ``epochs`` passes over its
        rollouts in minibatches of ``minibatch_size`` (None: all of them), when the method has them; else one."""
        h = self.hparams
        rollouts = prompts * h.samples_per_prompt
        return h.get("epochs", 1) * math.ceil(rollouts / (h.get("minibatch_size") or rollouts))

    def log_train(self, values: dict[str, Any], size: int, prog_bar: tuple[str, ...] = ("reward", "kl")) -> None:
        """``train/NAME`` of each value, and ``train/sampled``: the completions sampled so far."""
        for name, value in {**values, "sampled": float(self.sampled)}.items():
            self.log(f"train/{name}", value, batch_size=size, prog_bar=name in prog_bar)

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

    # ---- hooks -------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        trainer = self.trainer
        self.reference.prepare(self.policy, {}, self.device, trainer.precision_plugin.forward_context, str(trainer.precision))

    def on_validation_start(self) -> None:
        self.on_fit_start()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["reference"] = self.reference.state_dict()
        checkpoint["sampled"] = self.sampled

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.reference.load_state_dict(checkpoint.get("reference", {}))
        self.sampled = checkpoint.get("sampled", 0)

    def shard_models(self, mesh) -> None:
        super().shard_models(mesh)
        self.reference.shard(lambda model: shard(model, mesh))

    def configure_optimizers(self) -> dict:
        """The optimizer and the schedule, sized in the updates the run makes (:mod:`~dpo_lit.rlhf.schedule`)."""
        trainer = self.trainer
        sizes = epoch_batch_sizes(trainer)
        # None (an iterable dataset or an unbounded run): Lightning's estimate (max_steps)
        return super().configure_optimizers(
            None if sizes is None else planned_updates(sizes, self.updates_per_batch, trainer.max_epochs, trainer.max_steps)
        )


