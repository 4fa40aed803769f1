"""Checkpoints a run can always be resumed or validated from, and a progress bar that adds up.

:class:`LastCheckpoint` makes every :class:`~lightning.pytorch.callbacks.ModelCheckpoint` also
write ``last.ckpt``, at each save and when fit ends (a run cut short by ``max_steps`` between
validations saves nothing else), so ``--ckpt_path last`` and ``validate --ckpt_path
.../last.ckpt`` always have something to load. :class:`EpochsFromSteps` turns
Lightning's "no epoch limit" (``max_epochs: -1`` beside ``max_steps``) into the number of epochs
``max_steps`` takes, so the progress bar shows ``Epoch 0/2`` and batches out of the epoch's,
not ``Epoch 0/-2`` and ``4/2``. The CLI adds both to every fit.
"""

from __future__ import annotations

import math

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(Callback):
    """``last.ckpt`` beside every run's checkpoints: ``save_last`` on every ModelCheckpoint (which
    then also writes it when fit ends at a step no checkpoint was saved at)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and not callback.save_last:
                callback.save_last = True


class EpochsFromSteps(Callback):
    """``max_epochs: -1`` with ``max_steps`` set becomes the epochs those steps take."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batches = trainer.num_training_batches
        if trainer.max_epochs == -1 and trainer.max_steps > 0 and 0 < batches < math.inf:
            # from the epoch a resumed run starts in (one that max_steps cut short counts as done)
            micro_batches = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            trainer.fit_loop.max_epochs = trainer.current_epoch + math.ceil(micro_batches / batches)
