"""Stop an online method's training once it has sampled a budget of completions.

``dpo-lit compare`` gives every method the same budget of completions sampled from a policy: an
offline method's are the start model's samples its pairs were made from, an online method's its
rollouts. :class:`RolloutBudget` ends the run after the batch that reaches ``completions`` (the
count is a whole number of batches, so it can pass the budget by less than one batch's rollouts;
the count reached is the module's ``sampled`` and is logged as ``train/sampled``).
"""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from dpo_lit.errors import ConfigError


class RolloutBudget(Callback):
    """Stop when the module's training rollouts reach ``completions`` (an :class:`~dpo_lit.rlhf.online.OnlineModule`).

    Args:
        completions: the budget of sampled completions.
    """

    def __init__(self, completions: int) -> None:
        if completions < 1:
            raise ConfigError(f"RolloutBudget: completions must be >= 1, got {completions}")
        self.completions = completions

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "sampled"):
            raise ConfigError(f"RolloutBudget: {type(pl_module).__name__} samples no rollouts (an online method's callback)")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if pl_module.sampled >= self.completions and not trainer.should_stop:
            rank_zero_info(f"RolloutBudget: {pl_module.sampled} completions sampled (budget {self.completions}): stopping")
            trainer.should_stop = True
