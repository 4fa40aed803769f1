"""PPO's learning-rate schedule, sized in the optimizer updates the run will make.

Under manual optimisation Lightning's ``global_step`` counts optimizer updates, but its
``estimated_stepping_batches`` counts *batches* (``min(max_steps, epochs · batches)``), while one
PPO batch of prompts makes ``ppo_epochs · ceil(rollouts / minibatch_size)`` updates, and a smaller
last batch fewer. Lightning compares ``global_step`` with ``max_steps`` only between batches, so
the batch that reaches it runs all its updates. :func:`planned_updates` counts the updates exactly;
the schedule steps after each and ends at its final value (0 for ``linear``) after the last.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from lightning import Trainer


def updates_per_batch(prompts: int, samples_per_prompt: int, minibatch_size: int, ppo_epochs: int) -> int:
    """Optimizer updates of one PPO iteration: ``ppo_epochs`` passes over minibatches of the rollouts."""
    return ppo_epochs * math.ceil(prompts * samples_per_prompt / minibatch_size)


def planned_updates(
    batch_sizes: Sequence[int], updates: Callable[[int], int], max_epochs: int, max_steps: int
) -> int | None:
    """The optimizer updates of a run over epochs of prompt batches of ``batch_sizes``.

    Args:
        batch_sizes: prompts in each training batch of an epoch.
        updates: a batch's updates given its prompts (:func:`updates_per_batch`).
        max_epochs: the trainer's ``max_epochs`` (-1: unbounded).
        max_steps: the trainer's ``max_steps``, in updates (-1: unbounded); checked before each
            batch, as Lightning's fit loop does.

    Returns:
        The number of updates, or None when the run is unbounded.
    """
    per_batch = [updates(size) for size in batch_sizes]
    if sum(per_batch) == 0 or (max_epochs < 0 and max_steps < 0):
        return None
    total, epoch = 0, 0
    while max_epochs < 0 or epoch < max_epochs:
        for count in per_batch:
            if 0 <= max_steps <= total:
                return total
            total += count
        epoch += 1
    return total


def epoch_batch_sizes(trainer: Trainer) -> list[int] | None:
    """Prompts in each training batch of an epoch, as far as ``limit_train_batches`` runs, from the
    training dataloader's sampler length, ``batch_size`` and ``drop_last`` (nothing is drawn, so
    the data order is untouched); None for a loader without them (an iterable dataset)."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()  # what estimated_stepping_batches does, also when max_epochs is -1
    loader = trainer.train_dataloader
    size, sampler = getattr(loader, "batch_size", None), getattr(loader, "sampler", None)
    if not size or not hasattr(sampler, "__len__"):
        return None
    full, rest = divmod(len(sampler), size)  # a DistributedSampler's length is this process's share
    sizes = [size] * full + ([rest] if rest and not loader.drop_last else [])
    limit = trainer.num_training_batches
    return sizes if limit == float("inf") else sizes[: int(limit)]
