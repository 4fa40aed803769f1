"""No update with non-finite values: :class:`NonFiniteGuard` skips the optimizer step instead.

A NaN or Inf in the loss spreads to every gradient in the backward pass, and one optimizer step
with it makes every weight NaN for good. The guard looks at the gradients when the optimizer is
about to step (after accumulation and AMP unscaling): if any is non-finite, it drops them all,
so the optimizer leaves the weights and its own state (Adam's moments, its step count) as they
were; the LR schedule still advances. It counts the skipped steps in ``train/skipped_steps``,
warns naming the batch's records (``file:line``), and stops the run with one line when
``max_in_a_row`` steps in a row were skipped. The CLI adds it to every fit.

Under fp16 mixed precision a ``GradScaler`` already skips every step whose scaled gradients
overflowed, and lowers its scale: an overflow there is the scaler finding its range, not a diverged
run. With a scaler the guard leaves the gradients and the skipping to it and counts only the steps
whose loss itself was not finite. A step the scaler skips updates nothing all the same, so those
are counted apart, in ``train/scaler_skipped_steps`` (a run's updates are its steps less these).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer

from dpo_lit.errors import ConfigError, UserError


class NonFiniteError(UserError):
    """Training stopped: too many optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard(Callback):
    """Skips an optimizer step whose gradients hold a NaN or Inf; stops after ``max_in_a_row``.

    Args:
        max_in_a_row: consecutive skipped steps that stop the run (a diverged run, not a bad batch).
    """

    def __init__(self, max_in_a_row: int = 5) -> None:
        if max_in_a_row < 1:
            raise ConfigError(f"NonFiniteGuard: max_in_a_row must be at least 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.skipped = 0
        self.in_a_row = 0
        self.scaler_skipped = 0  # steps a GradScaler skipped (overflowed gradients): not divergence
        self._indices: list[int] = []  # examples of the micro-batches since the last step
        self._loss_finite = True  # every micro-batch's loss since the last step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, dict) and "index" in batch:
            self._indices += batch["index"].tolist()

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grads_finite = finite_gradients(optimizer)  # unscaled by now, as the scaler's own check sees them
        if scaler is not None:  # the scaler skips overflowed steps itself: only a non-finite loss counts
            self.scaler_skipped += not grads_finite
            pl_module.log(
                "train/scaler_skipped_steps", float(self.scaler_skipped), on_step=True, on_epoch=False
            )
            finite = self._loss_finite
        else:
            finite = grads_finite
        finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))  # skip on every rank
        records, self._indices, self._loss_finite = self._indices, [], True
        if finite:
            self.in_a_row = 0
        else:
            if scaler is None:
                for group in optimizer.param_groups:  # no gradient: the optimizer passes the parameter by
                    for p in group["params"]:
                        p.grad = None
            self._skip(trainer, records)
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def _skip(self, trainer: Trainer, records: list[int]) -> None:
        """Count a skipped step; warn naming its records, or stop after ``max_in_a_row``."""
        self.skipped += 1
        self.in_a_row += 1
        where = describe_records(trainer, records)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"training stopped at step {trainer.global_step}: {self.in_a_row} optimizer steps in a row had a "
                f"non-finite loss or gradient (last batch: {where}); lower the learning rate, clip gradients "
                "(trainer.gradient_clip_val) or train in float32"
            )
        rank_zero_warn(f"step {trainer.global_step}: non-finite loss or gradient, optimizer step skipped ({where})")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row, "scaler_skipped": self.scaler_skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict.get("skipped", 0)
        self.in_a_row = state_dict.get("in_a_row", 0)
        self.scaler_skipped = state_dict.get("scaler_skipped", 0)


def finite_gradients(optimizer: Optimizer) -> bool:
    """Whether every gradient the optimizer would apply is finite (True when it has none)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


def describe_records(trainer: Trainer, indices: list[int], limit: int = 4) -> str:
    """``file:line`` of the training examples at ``indices`` (their indices where none is known)."""
    dataset = getattr(trainer.datamodule, "train_dataset", None) if trainer.datamodule is not None else None
    examples = getattr(dataset, "examples", None)
    names = [
        str(examples[i].get("source", f"example {i}")) if examples is not None else f"example {i}"
        for i in dict.fromkeys(indices)
    ]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return "records " + ", ".join(names[:limit]) + more if names else "no records known"
