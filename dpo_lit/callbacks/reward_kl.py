"""Reward and KL(π‖π_ref) of the policy on held-out prompts during training: the two axes of a
reward–KL frontier (Rafailov et al. 2023, Figure 2).

Every ``every_n_steps`` optimizer steps and at the end of training, :class:`HeldoutRewardKL`
samples ``num_samples`` completions of each held-out prompt from the policy (temperature 1, no
top-k/top-p, the same seed every time), scores them with a :class:`~dpo_lit.rewards.Reward`, and
scores the same token ids under the reference. It logs ``heldout/reward``, ``heldout/kl`` and their
standard errors (over prompts: the k samples of a prompt are averaged first, as they are not k
independent draws), and keeps every point in :attr:`HeldoutRewardKL.points` and every scored sample in
:attr:`HeldoutRewardKL.samples` (to read them, to score them with a second judge, or to pair two
runs prompt by prompt). The KL is the unbiased sequence-level estimate of :mod:`dpo_lit.sampling.kl`;
the reward is the mean over all samples.

It works with every module that has ``policy``, ``reference`` and ``tokenizer``: DPO and its
family, PPO, SFT. When the module keeps no reference model (a reference-free loss such as SFT's)
and the policy is a LoRA model, the reference is the policy with its adapter off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning import Callback, LightningModule, Trainer

from dpo_lit.data.io import DataSource
from dpo_lit.data.prompts import encode_prompts, read_prompts
from dpo_lit.errors import ConfigError
from dpo_lit.rewards import Reward
from dpo_lit.sampling.kl import mean_se
from dpo_lit.sampling.measure import HeldoutSample, MeasureSpec, measure, reference_model


@dataclass
class RewardKLPoint:
    """One evaluation: the optimizer step it followed, mean reward and sampled KL, each ± SE."""

    step: int
    reward: float
    reward_se: float
    kl: float
    kl_se: float
    finished: float


def summarize_samples(samples: list[HeldoutSample]) -> RewardKLPoint:
    """Mean reward and KL (the mean log-ratio) of one evaluation's samples, each ± its standard error
    over prompts (the samples of one prompt are averaged first: :func:`~dpo_lit.sampling.kl.mean_se`)."""
    prompts = [s.prompt_index for s in samples]
    reward, reward_se = mean_se([s.reward for s in samples], prompts)
    kl, kl_se = mean_se([s.log_ratio for s in samples], prompts)
    return RewardKLPoint(samples[0].step, reward, reward_se, kl, kl_se, sum(s.finished for s in samples) / len(samples))


def reference_of(pl_module: LightningModule):
    """``(model, context)`` of the module's reference (:func:`~dpo_lit.sampling.measure.reference_model`);
    a run that keeps none is a ConfigError."""
    found = reference_model(pl_module)
    if found is None:
        raise ConfigError(
            "HeldoutRewardKL: this run keeps no reference model (full fine-tuning with precomputed or no "
            "reference log-probs); use model.reference: copy, or LoRA"
        )
    return found


def sample_and_score(
    policy, reference, context, tokenizer, prompts: list, prompt_ids: list[list[int]], reward: Reward,
    num_samples: int, max_new_tokens: int, batch_size: int, seed: int, step: int = 0,
) -> list[HeldoutSample]:
    """The scored samples of :func:`~dpo_lit.sampling.measure.measure` with a reward and a reference
    (run inside ``context()``)."""
    spec = MeasureSpec(num_samples, max_new_tokens, batch_size, seed)
    return measure(policy, tokenizer, prompts, prompt_ids, spec, reward, reference, context, step).samples


def reward_and_kl(
    policy, reference, context, tokenizer, prompts: list, prompt_ids: list[list[int]], reward: Reward,
    num_samples: int, max_new_tokens: int, batch_size: int, seed: int, step: int = 0,
) -> RewardKLPoint:
    """:func:`sample_and_score` summarised: mean reward and sampled KL(π‖π_ref), each ± SE."""
    return summarize_samples(sample_and_score(
        policy, reference, context, tokenizer, prompts, prompt_ids, reward, num_samples, max_new_tokens, batch_size,
        seed, step,
    ))  # fmt: skip


class HeldoutRewardKL(Callback):
    """Held-out reward and sampled KL(π‖π_ref) along training.

    Args:
        prompts_file: held-out prompts (``.txt``, one a line, or a data file with a ``prompt`` field).
        reward: scores ``prompt`` + completion texts (e.g. :class:`~dpo_lit.rewards.classifier.SentimentClassifier`).
        num_prompts: use the first ``num_prompts`` prompts (None: all).
        num_samples: completions per prompt.
        max_new_tokens: bound on a completion's tokens.
        chat: render prompts with the chat template (None: when the tokenizer has one).
        batch_size: rows per ``generate`` call and per reference forward.
        seed: sampling seed, the same at every evaluation (evaluations, and runs, are paired).
        every_n_steps: evaluate every n optimizer steps (0: only at the end of training).
        at_start: also evaluate before the first step (the starting model: KL 0).
    """

    def __init__(
        self,
        prompts_file: DataSource,
        reward: Reward,
        num_prompts: int | None = None,
        num_samples: int = 2,
        max_new_tokens: int = 32,
        chat: bool | None = None,
        batch_size: int = 32,
        seed: int = 1234,
        every_n_steps: int = 0,
        at_start: bool = False,
    ) -> None:
        if num_samples < 1 or (num_prompts is not None and num_prompts < 1) or every_n_steps < 0:
            raise ConfigError(
                "HeldoutRewardKL: num_samples and num_prompts must be >= 1, every_n_steps >= 0; got "
                f"{num_samples}, {num_prompts}, {every_n_steps}"
            )
        self.prompts_file, self.reward = prompts_file, reward
        self.num_prompts, self.num_samples, self.max_new_tokens = num_prompts, num_samples, max_new_tokens
        self.chat, self.batch_size, self.seed = chat, batch_size, seed
        self.every_n_steps, self.at_start = every_n_steps, at_start
        self.points: list[RewardKLPoint] = []
        self.samples: list[HeldoutSample] = []
        self._prompts: list = []
        self._ids: list[list[int]] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self._ids:
            self._prompts = read_prompts(self.prompts_file)[: self.num_prompts]
            if len(self._prompts) * self.num_samples < 2:
                raise ConfigError(f"HeldoutRewardKL: need at least 2 samples for a standard error ({self.prompts_file})")
            self._ids = encode_prompts(pl_module.tokenizer, self._prompts, self.chat)

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> list[HeldoutSample]:
        """Sample, score and estimate the KL now."""
        reference, context = reference_of(pl_module)
        with trainer.precision_plugin.forward_context():
            return sample_and_score(
                pl_module.policy, reference, context, pl_module.tokenizer, self._prompts, self._ids, self.reward,
                self.num_samples, self.max_new_tokens, self.batch_size, self.seed, trainer.global_step,
            )  # fmt: skip

    def _record(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.points and self.points[-1].step == trainer.global_step:
            return  # once per optimizer step (gradient accumulation, the end right after a point)
        samples = self.measure(trainer, pl_module)
        point = summarize_samples(samples)
        self.samples += samples
        self.points.append(point)
        metrics = {f"heldout/{key}": getattr(point, key) for key in ("reward", "reward_se", "kl", "kl_se")}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=point.step)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_start and trainer.global_step == 0:
            self._record(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step:
            self._record(trainer, pl_module)
