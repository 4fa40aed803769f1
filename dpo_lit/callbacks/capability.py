"""Capability preservation: does preference training cost the policy perplexity or accuracy?

:class:`CapabilityEval` scores the reference model once (when fit starts the policy *is* the
reference) and the policy at the end of validation, on perplexity (WikiText-2, any text file),
LAMBADA and multiple-choice tasks scored as lm-evaluation-harness scores them
(:func:`dpo_lit.evaluation.evaluate_task`).
It logs ``cap/<task>/<metric>``, ``cap/<task>/<metric>_delta`` (policy − reference),
``cap/<task>/<metric>_ref`` (once) and ``cap/seconds``, and can warn or stop training when a
metric regresses by more than a relative threshold.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from dpo_lit.errors import ConfigError
from dpo_lit.evaluation.evaluate import TaskData, evaluate_task, load_task_data
from dpo_lit.evaluation.tasks import task_name
from dpo_lit.metrics import better
from dpo_lit.models import load_model

Scores = dict[str, dict[str, float]]  # task -> metric -> value

DEFAULT_TASKS = ("wikitext", "arc_easy", "piqa")


@dataclass(frozen=True)
class CapabilityRow:
    """One line of the last evaluation's table."""

    task: str
    metric: str
    reference: float
    policy: float
    delta: float


def relative_regression(metric: str, reference: float, policy: float) -> float:
    """How much worse the policy is, relative to the reference: a drop for accuracies, a rise for
    perplexity (0.1 = 10% worse; negative when better)."""
    worse = reference - policy if better(metric) == "higher" else policy - reference
    return worse / max(abs(reference), 1e-12)


class CapabilityEval(Callback):
    """Perplexity and multiple-choice accuracy of the policy against the reference during training.

    Args:
        tasks: registered tasks (``wikitext``, ``arc_easy``, ``arc_challenge``, ``piqa``, ``boolq``,
            ``hellaswag``, ``lambada``; see :mod:`dpo_lit.evaluation.tasks`), paths of generic
            ``.jsonl`` files (``{"context", "choices", "answer"}``) or of ``.txt`` files (scored by
            perplexity); a file's metrics are named after its stem.
        limit: items per multiple-choice or LAMBADA task (a seeded random subset; None: all).
        perplexity_tokens: tokens of text scored by a perplexity task (None: the whole text).
        context_length: tokens per perplexity window.
        batch_size: sequences per forward pass.
        every_n_val: evaluate the policy at every n-th validation run of fit (always in validate).
        max_regression: relative drop of an accuracy (``acc``, ``acc_norm``) or relative rise of
            perplexity beyond which to act (0.05 = 5%); None: never act.
        on_regression: ``warn`` names the task, metric and values; ``stop`` also ends training.
        seed: seed of the ``limit`` subsets.
    """

    def __init__(
        self,
        tasks: Sequence[str] = DEFAULT_TASKS,
        limit: int | None = 200,
        perplexity_tokens: int | None = 4096,
        context_length: int = 512,
        batch_size: int = 8,
        every_n_val: int = 1,
        max_regression: float | None = None,
        on_regression: Literal["warn", "stop"] = "warn",
        seed: int = 0,
    ) -> None:
        if every_n_val < 1:
            raise ConfigError(f"CapabilityEval: every_n_val must be at least 1, got {every_n_val}")
        names = [task_name(task) for task in tasks]
        if len(set(names)) < len(names):
            raise ConfigError(f"CapabilityEval: two tasks share a metric name in {list(tasks)}")
        self.tasks = list(tasks)
        self.limit = limit
        self.perplexity_tokens = perplexity_tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.every_n_val = every_n_val
        self.max_regression = max_regression
        self.on_regression = on_regression
        self.seed = seed
        self.reference: Scores | None = None
        self.table: list[CapabilityRow] = []
        self._data: dict[str, TaskData] = {}
        self._tokenizer = None
        self._validations = 0
        self._ref_logged = False

    # ---- evaluation ------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._data:
            return
        self._tokenizer = pl_module.tokenizer
        for task in self.tasks:
            data = load_task_data(task, limit=self.limit, seed=self.seed)
            self._data[data.name] = data

    def evaluate(self, trainer: Trainer, model: nn.Module, tasks: Sequence[str] | None = None) -> Scores:
        """Metrics of ``model`` on ``tasks`` (default: all), in eval mode without gradients, under
        the trainer's precision; the model's training modes are restored after."""
        scores: Scores = {}
        with trainer.precision_plugin.forward_context():
            for task in self._data if tasks is None else tasks:
                scores[task] = evaluate_task(
                    model,
                    self._tokenizer,
                    self._data[task],
                    self.batch_size,
                    self.perplexity_tokens,
                    self.context_length,
                )
        return scores

    def _reference_model(self, trainer: Trainer, pl_module: LightningModule) -> nn.Module:
        """The policy while nothing has been trained or loaded into it; else a fresh copy of the
        weights ``model_name`` names (what every reference strategy starts from)."""
        if trainer.ckpt_path is None:
            return pl_module.policy
        rank_zero_info(
            "CapabilityEval: loading the reference model to score it (no scores in the checkpoint)"
        )
        hparams = pl_module.hparams
        model = load_model(hparams.model_name, hparams.get("dtype"), hparams.get("trust_remote_code", False))
        return model.to(pl_module.device)

    def _score_reference(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score the reference on the tasks it has no scores for (all, unless a checkpoint had some)."""
        missing = [task for task in self._data if task not in (self.reference or {})]
        if not missing:
            return
        start = time.perf_counter()
        scores = self.evaluate(trainer, self._reference_model(trainer, pl_module), missing)
        self.reference = {**(self.reference or {}), **scores}
        rank_zero_info(f"CapabilityEval: reference scored in {time.perf_counter() - start:.1f} s")

    # ---- hooks -----------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._score_reference(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._score_reference(trainer, pl_module)  # validate without fit; a no-op after fit start

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.reference is None:
            return
        self._validations += 1
        if trainer.state.fn == "fit" and self._validations % self.every_n_val:
            return
        start = time.perf_counter()
        policy = self.evaluate(trainer, pl_module.policy)
        seconds = time.perf_counter() - start
        self.table = [
            CapabilityRow(
                task, metric, self.reference[task][metric], value, value - self.reference[task][metric]
            )
            for task, metrics in policy.items()
            for metric, value in metrics.items()
        ]
        self._log(pl_module, seconds)
        self._check(trainer)

    def _log(self, pl_module: LightningModule, seconds: float) -> None:
        for row in self.table:
            name = f"cap/{row.task}/{row.metric}"
            pl_module.log(name, row.policy)
            pl_module.log(f"{name}_delta", row.delta)
            if not self._ref_logged:
                pl_module.log(f"{name}_ref", row.reference)
        self._ref_logged = True
        pl_module.log("cap/seconds", seconds)

    def _check(self, trainer: Trainer) -> None:
        if self.max_regression is None:
            return
        regressed = [
            row
            for row in self.table
            if better(row.metric) is not None
            and relative_regression(row.metric, row.reference, row.policy) > self.max_regression
        ]
        for row in regressed:
            change = relative_regression(row.metric, row.reference, row.policy)
            rank_zero_warn(
                f"CapabilityEval: {row.task}/{row.metric} regressed by {change:.1%} "
                f"(reference {row.reference:.4g}, policy {row.policy:.4g}; "
                f"max_regression={self.max_regression:g})"
                + ("; stopping training" if self.on_regression == "stop" else "")
            )
        if regressed and self.on_regression == "stop":
            trainer.should_stop = True

    def format_table(self) -> str:
        """The last evaluation as an aligned text table (for ``validate`` to print)."""
        lines = [f"{'task':<16}{'metric':<15}{'reference':>12}{'policy':>12}{'delta':>12}"]
        for row in self.table:
            lines.append(
                f"{row.task:<16}{row.metric:<15}{row.reference:>12.5g}{row.policy:>12.5g}{row.delta:>+12.4g}"
            )
        return "\n".join(lines)

    # ---- checkpoints: the reference's scores survive a resume ---------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict.get("reference")
