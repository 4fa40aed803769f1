"""Checkpoints a run can always be resumed or validated from, and a progress bar that adds up.

:class:`LastCheckpoint` makes every :class:`~lightning.pytorch.callbacks.ModelCheckpoint` also
write ``last.ckpt``, at each save and when fit ends (a run cut short by ``max_steps`` between
validations saves nothing else), so ``--ckpt_path last`` and ``validate --ckpt_path
.../last.ckpt`` always have something to load. Every checkpoint is written whole or not at all
(:class:`AtomicCheckpointIO`) and carries the Python, NumPy and torch RNG states, so a resumed
run continues exactly as the uninterrupted one would have. To also keep a checkpoint every N
steps, add one: ``--trainer.callbacks+=ModelCheckpoint --trainer.callbacks.every_n_train_steps=N
--trainer.callbacks.save_top_k=-1``. :class:`EpochsFromSteps` turns
Lightning's "no epoch limit" (``max_epochs: -1`` beside ``max_steps``) into the number of epochs
``max_steps`` takes, so the progress bar shows ``Epoch 0/2`` and batches out of the epoch's,
not ``Epoch 0/-2`` and ``4/2``. :class:`StepFromCheckpoint` logs ``validate``'s metrics at the
checkpoint's step. The CLI adds all three to every run.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from dpo_lit.errors import OutputError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to ``NAME.partial`` beside it, syncs it to disk, then renames it onto
    ``NAME``: a run killed mid-write leaves the previous checkpoint whole. (Lightning's own writer
    stages the file in the system's temporary folder and moves it, which is a plain copy, not a
    rename, whenever that folder is on another file system.) A failed write (a full disk, a folder
    it may not write) is an :class:`~dpo_lit.errors.OutputError` naming the file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise OutputError(path, error) from error


class LastCheckpoint(Callback):
    """``last.ckpt`` beside every run's checkpoints: ``save_last`` on every ModelCheckpoint (which
    then also writes it when fit ends at a step no checkpoint was saved at); checkpoints written
    atomically, with the RNG states."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and not callback.save_last:
                callback.save_last = True
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own, not async
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng = state_dict.get("rng")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The saved RNG states, once everything before the first step (setup, the reference's
        # precompute, the sanity check) has drawn from the generators: dropout and sampling go on
        # from where the interrupted run was.
        if getattr(self, "_rng", None):
            set_rng_states(self._rng)
            self._rng = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # ModelCheckpoint writes last.ckpt when fit ends only if it wrote none before: one saved
        # every N steps would leave last.ckpt behind the final step. (Checkpoint callbacks' hooks
        # run after the others', so this comes first.)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback._last_global_step_saved != trainer.global_step:
                callback._last_checkpoint_saved = ""


class EpochsFromSteps(Callback):
    """``max_epochs: -1`` with ``max_steps`` set becomes the epochs those steps take."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batches = trainer.num_training_batches
        if trainer.max_epochs == -1 and trainer.max_steps > 0 and 0 < batches < math.inf:
            epochs = trainer.fit_loop.epoch_progress.current
            # resumed mid-epoch, that epoch goes on after the batches it did
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer.fit_loop.restarted_mid_epoch else 0
            micro_batches = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            # A run resumed at an epoch's end counts that epoch once more (Lightning replays its end):
            # one spare epoch, never one short; max_steps ends the run either way.
            spare = int(trainer.ckpt_path is not None)
            trainer.fit_loop.max_epochs = epochs.processed + math.ceil((done + micro_batches) / batches) + spare


def rng_states() -> dict[str, Any]:
    """Python's, NumPy's and torch's (CPU and CUDA) RNG states, as plain values a checkpoint
    loaded with ``weights_only=True`` may hold (NumPy's key array becomes a list)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
              "torch": torch.get_rng_state()}  # fmt: skip
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    random.setstate(tuple(item if not isinstance(item, list) else tuple(item) for item in states["python"]))
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class StepFromCheckpoint(Callback):
    """``validate`` (or ``predict``) of a checkpoint logs at the step the checkpoint was taken.

    Lightning restores its step counters only when fitting, so a validation of a trained checkpoint
    would be logged at step 0, where the initial model's metrics sit on the same curve. The logging
    step is the fit loop's count of batches that stepped, restored here from the checkpoint (it is
    the step the run's own validation at that checkpoint was logged at).
    """

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            return  # fit restores its loops itself
        epoch_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
        trainer.fit_loop.epoch_loop._batches_that_stepped = epoch_loop.get("_batches_that_stepped", 0)
