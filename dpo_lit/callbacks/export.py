"""Save the trained model with ``save_pretrained`` next to the checkpoints when fit ends.

The trained model is the module's ``policy``, or its ``reward_model`` for a reward model."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


class ExportPretrained(Callback):
    """Write ``<run>/policy`` (the full model, or the LoRA adapter) and optionally ``<run>/merged``.

    ``<run>`` is the folder that holds ``checkpoints/`` (the logger's version folder). Each export
    carries the tokenizer, so ``AutoModelForCausalLM.from_pretrained(path)`` (or peft's
    ``AutoPeftModelForCausalLM`` for an adapter) loads it directly.

    Args:
        enabled: export at the end of ``fit``.
        merge: with LoRA, also write the base model with the adapter merged into its weights.
    """

    def __init__(self, enabled: bool = True, merge: bool = False) -> None:
        self.enabled = enabled
        self.merge = merge

    @staticmethod
    def run_dir(trainer: Trainer) -> Path:
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath).parent
        return Path(trainer.log_dir or trainer.default_root_dir)

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.fast_dev_run:
            return
        root = self.run_dir(trainer)
        tokenizer = pl_module.tokenizer
        policy = getattr(pl_module, "reward_model", None) or pl_module.policy
        with _base_named_as_configured(policy, getattr(pl_module.hparams, "model_name", None)):
            policy.save_pretrained(root / "policy")
        tokenizer.save_pretrained(root / "policy")
        rank_zero_info(f"Policy saved to {root / 'policy'}")
        if self.merge and hasattr(policy, "merge_and_unload"):
            merged = copy.deepcopy(policy).merge_and_unload()
            merged.save_pretrained(root / "merged")
            tokenizer.save_pretrained(root / "merged")
            rank_zero_info(f"Merged model saved to {root / 'merged'}")


@contextlib.contextmanager
def _base_named_as_configured(policy, model_name: str | None):
    """A LoRA adapter's ``adapter_config.json`` names its base model as the run's ``model_name``
    (a Hub name, an alias, a folder as the user wrote it), not the local cache folder it was loaded
    from, which exists on this machine only."""
    configs = list(getattr(policy, "peft_config", {}).values())
    saved = [config.base_model_name_or_path for config in configs]
    if model_name is not None:
        for config in configs:
            config.base_model_name_or_path = model_name
    try:
        yield
    finally:
        for config, name in zip(configs, saved):
            config.base_model_name_or_path = name
