"""What every trained module does to its policy, whatever it trains it for (DPO, SFT, a reward model,
PPO): a LoRA adapter or not (:class:`LoRASettings`), train mode and activation checkpointing
(:func:`trainable`), the optimizer and LR schedule by name (:func:`optimizer_and_schedule`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from lightning import LightningModule

from dpo_lit.errors import ConfigError


@dataclass
class LoRASettings:
    """A LoRA adapter on the policy (peft).

    Args:
        r: rank of the update matrices.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter's input.
        target_modules: module names to adapt, or "all-linear" for every linear layer but the head.
        extra: further ``peft.LoraConfig`` arguments (e.g. ``use_rslora: true``).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"model.lora.r: the rank must be at least 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"model.lora.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {self.dropout}")


def trainable(model, lora: LoRASettings | None, gradient_checkpointing: bool, task_type: str = "CAUSAL_LM"):
    """A loaded model made ready to train: train mode (``from_pretrained`` returns eval mode and
    Lightning keeps modules' modes), wrapped with a LoRA adapter when ``lora`` is set (peft;
    ``SEQ_CLS`` also trains a classifier's head), activations recomputed in the backward pass
    when ``gradient_checkpointing``."""
    model.train()
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules, task_type=task_type, **lora.extra,
        )
        if lora.target_modules != "all-linear":
            check_targets(model, lora.target_modules)
        model = get_peft_model(model, config)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def check_targets(model, targets: str | list[str]) -> None:
    """LoRA target modules that name no module of ``model`` (a typo, another architecture's names)
    are a ConfigError listing the linear layers it has; peft would go on while one name matches."""
    modules = [name for name, _ in model.named_modules()]
    if isinstance(targets, str):  # peft takes a string for a regular expression over the full names
        missing = [] if any(re.fullmatch(targets, name) for name in modules) else [targets]
    else:
        missing = [target for target in targets if target not in {name.rsplit(".", 1)[-1] for name in modules}]
    if missing:
        linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
        raise ConfigError(
            f"model.lora.target_modules: {', '.join(missing)} not in {type(model).__name__}; its linear layers are "
            f"{', '.join(sorted(linear))} (or use all-linear)"
        )


def optimizer_and_schedule(module: LightningModule, params: list, total: int | None = None) -> dict:
    """``configure_optimizers``' answer for a module with ``optimizer_factory`` and the hparams
    ``scheduler``, ``warmup_ratio`` and ``scheduler_kwargs``: a schedule over ``total`` optimizer
    steps (None: Lightning's estimate, one step per batch), stepped every optimizer step."""
    from transformers import get_scheduler

    optimizer = module.optimizer_factory(params)
    total = max(1, int(module.trainer.estimated_stepping_batches if total is None else total))
    hparams = module.hparams
    try:
        scheduler = get_scheduler(
            hparams.scheduler, optimizer, num_warmup_steps=int(hparams.warmup_ratio * total),
            num_training_steps=total, scheduler_specific_kwargs=hparams.scheduler_kwargs,
        )
    except ValueError as error:  # an unknown name: transformers lists the valid ones
        raise ConfigError(f"model.scheduler: {error}") from None
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}
