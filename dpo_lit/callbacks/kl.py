"""KL(π ‖ π_ref) measured during training on samples from the policy (:mod:`dpo_lit.sampling.kl`).

:class:`SampledKL` samples completions of a fixed set of held-out prompts from the policy at
temperature 1 without top-k/top-p, scores them under the reference, and logs the mean log-ratio:
an unbiased estimate of the sequence-level KL between the ``max_new_tokens``-truncated sampling
distributions, in nats per completion, with its standard error over prompts (each prompt's samples
averaged first: :func:`~dpo_lit.sampling.kl.mean_se`). The prompts and the sampling seed
are the same at every evaluation, so consecutive values are paired: they differ by the policy's
change, not by a new draw of prompts or random numbers. It logs

- ``val/kl``, ``val/kl_stderr``, ``val/kl_finished`` (share of samples that ended with an EOS)
  at the end of every validation;
- ``train/kl``, ``train/kl_stderr`` every ``every_n_steps`` optimizer steps (0: never);

and warns (optionally stops training) when the KL jumps between consecutive evaluations. The
chosen-completion log-ratio of a DPO batch (``rewards/chosen / β``) is not a KL: this is.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dpo_lit.data.io import DataSource
from dpo_lit.data.prompts import encode_prompts, read_prompts
from dpo_lit.errors import ConfigError
from dpo_lit.sampling.kl import KLEstimate
from dpo_lit.sampling.measure import MeasureSpec, measure, reference_model

# Everyday requests, unlike the preference data shipped with the project: a held-out set on which
# the policy's drift from the reference shows up without any task-specific behaviour.
DEFAULT_PROMPTS = (
    "Describe your ideal Sunday morning.",
    "What is a good way to start learning to cook?",
    "Tell me about a walk in the park in autumn.",
    "How do you keep a houseplant alive?",
    "Write a short note thanking a neighbour for their help.",
    "What should I pack for a weekend by the sea?",
    "Explain how to make a cup of tea.",
    "What do you think about working from home?",
    "Give me three ideas for a rainy afternoon.",
    "Describe the sound of a busy train station.",
    "How would you plan a birthday dinner for a friend?",
    "What makes a good first day at a new job?",
    "Tell me about riding a bicycle through town.",
    "How can I get better sleep?",
    "Describe a small bakery on a quiet street.",
    "What is the best way to tidy a messy desk?",
)


class KLPoint(NamedTuple):
    """One evaluation: the optimizer step it followed, the KL estimate and its standard error."""

    step: int
    mean: float
    stderr: float


def kl_jumped(previous: float, current: float, factor: float, min_jump: float) -> bool:
    """Whether the KL grew by more than ``factor``× *and* by more than ``min_jump`` nats.

    The absolute floor keeps noise around a KL near zero (0.01 → 0.05 is 5×) from counting.
    """
    return current > factor * previous and current - previous > min_jump


class SampledKL(Callback):
    """Sampled KL(π ‖ π_ref) on a fixed held-out prompt set, logged at validation and every n steps.

    The estimate is unbiased: completions are sampled from the policy at temperature 1 with no
    top-k/top-p (:func:`dpo_lit.sampling.measure.measure`), and the reference scores those exact token
    ids. It is the KL of the truncated sampling distributions (completions end at EOS or after
    ``max_new_tokens``). Each evaluation costs ``num_prompts × num_samples`` sampled completions
    plus one reference forward over them.

    The reference is :func:`~dpo_lit.sampling.measure.reference_model`'s: the module's reference
    model (the frozen copy, or the policy with its LoRA adapter disabled), or for a module that keeps
    none (a reference-free loss, SFT) the LoRA policy with its adapter off. Full fine-tuning with
    precomputed or no reference log-probs keeps no reference model: then the callback warns once
    and does nothing.

    Args:
        prompts_file: held-out prompts: a ``.txt`` file (one per line) or a data file with a
            ``prompt`` field (see :func:`dpo_lit.data.prompts.read_prompts`); None: 16 built-in
            everyday prompts. Rendered with the chat template when the tokenizer has one.
        num_prompts: use the first ``num_prompts`` prompts of the file.
        num_samples: completions sampled per prompt.
        max_new_tokens: bound on the completion length (a cut completion keeps no EOS).
        batch_size: rows per ``generate`` call and per reference forward.
        seed: sampling seed, the same at every evaluation so that evaluations are paired.
        every_n_steps: also estimate every n optimizer steps and log ``train/kl`` (0: only at
            validation). Those values go straight to the loggers, as ``LearningRateMonitor`` does
            (through ``pl_module.log`` Lightning would re-send the last value at every logging
            step in between); callbacks such as ``EarlyStopping`` should monitor ``val/kl``.
        jump_factor: warn when the KL grows by more than this factor between consecutive
            evaluations and by more than ``min_jump`` nats (None: never warn).
        min_jump: the absolute growth, in nats, a jump must also exceed.
        stop_on_jump: also stop training (``trainer.should_stop``) on a jump.
    """

    def __init__(
        self,
        prompts_file: DataSource | None = None,
        num_prompts: int = 16,
        num_samples: int = 2,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        seed: int = 0,
        every_n_steps: int = 0,
        jump_factor: float | None = 3.0,
        min_jump: float = 0.5,
        stop_on_jump: bool = False,
    ) -> None:
        if num_prompts < 1 or num_samples < 1 or num_prompts * num_samples < 2:
            raise ConfigError(
                f"SampledKL needs at least 2 samples for a standard error; got num_prompts={num_prompts}, "
                f"num_samples={num_samples}"
            )
        if every_n_steps < 0:
            raise ConfigError(f"SampledKL: every_n_steps must be >= 0, got {every_n_steps}")
        self.prompts_file = prompts_file
        self.num_prompts = num_prompts
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.seed = seed
        self.every_n_steps = every_n_steps
        self.jump_factor = jump_factor
        self.min_jump = min_jump
        self.stop_on_jump = stop_on_jump
        self.history: list[KLPoint] = []
        self.last: KLEstimate | None = None
        self._prompts: list = []
        self._prompt_ids: list[list[int]] = []
        self._warned_no_reference = False

    # ---- evaluation ------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._prompt_ids:
            return
        prompts = read_prompts(self.prompts_file) if self.prompts_file else list(DEFAULT_PROMPTS)
        if not prompts:
            raise ConfigError(f"SampledKL: no prompts in {self.prompts_file}")
        self._prompts = prompts[: self.num_prompts]
        self._prompt_ids = encode_prompts(pl_module.tokenizer, self._prompts)

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> KLEstimate | None:
        """Estimate KL(π ‖ π_ref) now (None when no reference model is in memory)."""
        found = reference_model(pl_module)
        if found is None:
            if not self._warned_no_reference:
                rank_zero_warn(
                    "SampledKL: this run keeps no reference model in memory and its policy has no LoRA adapter "
                    "(full fine-tuning with precomputed or no reference log-probs); no KL is measured. Use "
                    "reference: copy, or LoRA."
                )
                self._warned_no_reference = True
            return None
        reference, context = found
        spec = MeasureSpec(self.num_samples, self.max_new_tokens, self.batch_size, self.seed)
        with trainer.precision_plugin.forward_context():
            return measure(
                pl_module.policy, pl_module.tokenizer, self._prompts, self._prompt_ids, spec,
                reference=reference, context=context,
            ).kl  # fmt: skip

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> KLEstimate | None:
        """Measure once per optimizer step in fit (a validation right after a train-step
        evaluation reuses it), record the history and check for a jump."""
        step = trainer.global_step
        if trainer.state.fn == "fit" and self.last is not None and self.history and self.history[-1].step == step:
            return self.last
        estimate = self.measure(trainer, pl_module)
        if estimate is None:
            return None
        self.last = estimate
        self.history.append(KLPoint(step, estimate.mean, estimate.stderr))
        self._check_jump(trainer)
        return estimate

    def _check_jump(self, trainer: Trainer) -> None:
        if self.jump_factor is None or len(self.history) < 2:
            return
        before, now = self.history[-2], self.history[-1]
        if not kl_jumped(before.mean, now.mean, self.jump_factor, self.min_jump):
            return
        rank_zero_warn(
            f"SampledKL: KL(π‖π_ref) jumped from {before.mean:.3g} ± {before.stderr:.2g} nats (step {before.step}) "
            f"to {now.mean:.3g} ± {now.stderr:.2g} nats (step {now.step}), more than {self.jump_factor:g}× "
            f"and {self.min_jump:g} nats: the policy is moving away from the reference fast; consider a lower "
            "learning rate or a larger beta" + ("; stopping training" if self.stop_on_jump else "")
        )
        if self.stop_on_jump:
            trainer.should_stop = True

    # ---- hooks -----------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step == 0 or step % self.every_n_steps:
            return
        if self.history and self.history[-1].step == step:  # gradient accumulation: once per step
            return
        estimate = self._evaluate(trainer, pl_module)
        if estimate is not None:
            metrics = {"train/kl": estimate.mean, "train/kl_stderr": estimate.stderr}
            # The logger step of this batch's train/ metrics: Lightning logs them at the count of
            # batches that stepped *before* this one, i.e. optimizer steps taken minus one.
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step - 1)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        estimate = self._evaluate(trainer, pl_module)
        if estimate is None:
            return
        pl_module.log("val/kl", estimate.mean)
        pl_module.log("val/kl_stderr", estimate.stderr)
        pl_module.log("val/kl_finished", estimate.finished_fraction)
        if trainer.state.fn != "fit":
            rank_zero_info(f"SampledKL: KL(π‖π_ref) = {estimate.mean:.4g} ± {estimate.stderr:.2g} nats")

    # ---- checkpoints: jump detection continues after a resume ---------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"history": [tuple(point) for point in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [KLPoint(*point) for point in state_dict.get("history", [])]
