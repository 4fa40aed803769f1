"""Is training moving at all? Gradient norm, the margins' trend, and a stuck warning.

:class:`TrainingHealth` logs ``train/grad_norm`` and ``train/margin_trend`` and warns
once when a DPO-family loss sits at ln 2 with zero reward margins: the policy still computes what
the reference computes, which is what a zero learning rate, ``beta = 0``, LoRA targets that match
no module or a "reference" that is the policy itself all look like.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from dpo_lit.errors import ConfigError

LN2 = math.log(2.0)


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of ``y`` over ``x`` (0 with fewer than two distinct ``x``)."""
    if len(points) < 2:
        return 0.0
    x = torch.tensor([p[0] for p in points], dtype=torch.float64)
    y = torch.tensor([p[1] for p in points], dtype=torch.float64)
    dx = x - x.mean()
    denominator = float((dx * dx).sum())
    return float((dx * (y - y.mean())).sum()) / denominator if denominator > 0 else 0.0


class TrainingHealth(Callback):
    """Gradient norm and margin trend each step; a warning when training is stuck.

    The learning rate is Lightning's ``LearningRateMonitor``'s job (the module names its schedule
    ``train/lr``); the monitored configs add both callbacks.

    Logged (Lightning sends them to the logger on its logging steps):

    - ``train/grad_norm``: total L2 norm of the trainable parameters' gradients (Lightning's
      ``grad_norm`` utility), taken in ``on_before_optimizer_step``: after accumulation and AMP
      unscaling, *before* gradient clipping (so it shows how far above ``gradient_clip_val`` the
      gradients are). Under sharded strategies (FSDP, DeepSpeed) it is this process's shard only.
    - ``train/margin_trend``: least-squares slope, per optimizer step, of ``train/rewards/margins``
      over the last ``window`` steps. Positive while the policy is still separating chosen from
      rejected; near 0 once it has plateaued (or never started).

    Args:
        window: optimizer steps in the margin trend.
        stuck_steps: consecutive steps at ln 2 with zero margins before warning.
        tol: how close to ln 2 the loss must be to count as "at ln 2".
    """

    MARGIN_TOL = 1e-4

    def __init__(self, window: int = 50, stuck_steps: int = 20, tol: float = 1e-3) -> None:
        if window < 2:
            raise ConfigError(f"TrainingHealth: window must be at least 2, got {window}")
        if stuck_steps < 1:
            raise ConfigError(f"TrainingHealth: stuck_steps must be at least 1, got {stuck_steps}")
        self.window = window
        self.stuck_steps = stuck_steps
        self.tol = tol
        self.margins: deque[tuple[int, float]] = deque(maxlen=window)
        self.last_grad_norm: float | None = None
        self.stuck_for = 0
        self.warned = False
        self._pending: list[tuple[float, float]] = []  # (loss, margin) of this step's micro-batches
        self._stepped = False  # the optimizer steps after this batch (the last of an accumulation)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        self.last_grad_norm = total_grad_norm(pl_module)
        pl_module.log("train/grad_norm", self.last_grad_norm)
        self._stepped = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped, self._stepped = self._stepped, False
        values = self._read(trainer, outputs)
        if values is not None:
            self._pending.append(values)
        if not stepped or not self._pending:  # gradient accumulation: the optimizer has not stepped yet
            return
        step = trainer.global_step
        loss = sum(v[0] for v in self._pending) / len(self._pending)
        margin = sum(v[1] for v in self._pending) / len(self._pending)
        self._pending = []
        self.margins.append((step, margin))
        if len(self.margins) >= 2:
            pl_module.log("train/margin_trend", slope(self.margins))
        self._check_stuck(loss, margin)

    @staticmethod
    def _read(trainer: Trainer, outputs: Any) -> tuple[float, float] | None:
        """This batch's loss and mean reward margin (None when the loss logs no margins)."""
        metrics = trainer.callback_metrics
        margin = metrics.get("train/rewards/margins")
        loss = metrics.get("train/loss")
        if loss is None:  # outputs["loss"] is divided by the accumulation factor
            out = outputs.get("loss") if isinstance(outputs, dict) else outputs
            loss = out * trainer.accumulate_grad_batches if isinstance(out, Tensor) else None
        if margin is None or loss is None:
            return None
        return float(loss), float(margin)

    def _check_stuck(self, loss: float, margin: float) -> None:
        if abs(loss - LN2) < self.tol and abs(margin) < self.MARGIN_TOL:
            self.stuck_for += 1
        else:
            self.stuck_for = 0
        if self.stuck_for >= self.stuck_steps and not self.warned:
            self.warned = True
            rank_zero_warn(
                f"TrainingHealth: loss has stayed at ln 2 with zero reward margins for {self.stuck_for} steps: "
                "the policy is not moving away from the reference — check beta > 0, the learning rate, "
                "that parameters require grad (LoRA targets), and that the reference is not the policy itself"
            )


def total_grad_norm(module: torch.nn.Module) -> float:
    """The 2-norm of all of ``module``'s gradients together; under FSDP each rank holds a shard of
    a gradient (a DTensor), whose norm is reduced over the ranks (every rank must call this)."""
    norms = []
    for param in module.parameters():
        if param.grad is not None:
            norm = torch.linalg.vector_norm(param.grad.detach(), 2.0)
            norms.append((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float())
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
