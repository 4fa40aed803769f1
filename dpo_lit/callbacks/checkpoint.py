"""Checkpoints a run can always be resumed or validated from, and a progress bar that adds up.

:class:`LastCheckpoint` makes every :class:`~lightning.pytorch.callbacks.ModelCheckpoint` also
write ``last.ckpt`` and writes it itself when fit ends at a step no checkpoint was saved at (a run
cut short by ``max_steps`` between validations), so ``--ckpt_path last`` and ``validate
--ckpt_path .../last.ckpt`` always have something to load. :class:`EpochsFromSteps` turns
Lightning's "no epoch limit" (``max_epochs: -1`` beside ``max_steps``) into the number of epochs
``max_steps`` takes, so the progress bar shows ``Epoch 0/2`` and batches out of the epoch's,
not ``Epoch 0/-2`` and ``4/2``. The CLI adds both to every fit.
"""

from __future__ import annotations

import math
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(Callback):
    """``last.ckpt`` beside every run's checkpoints, current at the end of fit."""

    def __init__(self) -> None:
        self.saved_step: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and not callback.save_last:
                callback.save_last = True

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self.saved_step = trainer.global_step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        callback = trainer.checkpoint_callback
        if not isinstance(callback, ModelCheckpoint) or callback.dirpath is None:
            return
        if self.saved_step != trainer.global_step:
            trainer.save_checkpoint(Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}")


class EpochsFromSteps(Callback):
    """``max_epochs: -1`` with ``max_steps`` set becomes the epochs those steps take."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batches = trainer.num_training_batches
        if trainer.max_epochs == -1 and trainer.max_steps > 0 and 0 < batches < math.inf:
            micro_batches = trainer.max_steps * trainer.accumulate_grad_batches
            trainer.fit_loop.max_epochs = math.ceil(micro_batches / batches)
