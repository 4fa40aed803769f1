"""What every trained module does to its model, whatever it trains it for (DPO, SFT, a reward model,
PPO): :class:`PolicyModule` holds the settings they share (the model's name and dtype, a LoRA adapter
or not, activation checkpointing, the optimizer and LR schedule), loads the model, makes it
trainable (:func:`trainable`) and builds the optimizer and schedule (:func:`optimizer_and_schedule`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from lightning import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from dpo_lit.errors import ConfigError
from dpo_lit.models import load_model, load_tokenizer
from dpo_lit.sharding import full_state_dict, is_sharded, shard


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


class PolicyModule(LightningModule):
    """The base of every trained module (:class:`~dpo_lit.module.PreferenceModule`,
    :class:`~dpo_lit.rlhf.SFTModule`, :class:`~dpo_lit.rlhf.RewardModule` and the online methods'
    :class:`~dpo_lit.rlhf.online.OnlineModule`): the settings of the model it trains, taken once here. A
    subclass names the model first, takes its own arguments and passes the rest on as ``**kwargs``
    (the CLI and ``--help`` list them as its own). Every argument of the subclass and of this class
    is saved as a hyperparameter, but the objects it names in ``hparams_ignore`` (kept in the state
    dict, or rebuilt from the config) and the optimizer.

    Args:
        model_name: the model trained: Hub name, local safetensors folder, ``.gguf`` file or alias
            (``smollm2-135m-instruct``, ``tiny-random-llama``); the tokenizer is linked to it.
        lora: train a LoRA adapter instead of all weights (None: full fine-tuning).
        optimizer: optimizer class and its arguments (``lr`` among them).
        scheduler: learning-rate schedule by its ``transformers`` name (``linear``, ``cosine``,
            ``constant``, ``constant_with_warmup``, ``cosine_with_restarts``, ``polynomial``,
            ``inverse_sqrt``, ...; ``transformers.get_scheduler``), stepped every optimizer step and
            named ``train/lr`` for ``LearningRateMonitor``.
        warmup_ratio: fraction of the optimizer steps spent warming up linearly from 0.
        scheduler_kwargs: further arguments of that schedule (e.g. ``num_cycles``).
        dtype: dtype of the loaded weights (use ``trainer.precision`` for mixed precision).
        trust_remote_code: allow the Hub model's own Python code to run (off unless asked).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
    """

    hparams_ignore: tuple[str, ...] = ()

    def __init__(
        self,
        model_name: str,
        lora: LoRASettings | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: str = "linear",
        warmup_ratio: float = 0.1,
        scheduler_kwargs: dict[str, Any] | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", *self.hparams_ignore])  # the subclass's arguments too
        self.model_name, self.lora, self.dtype_name = model_name, lora, dtype
        self.trust_remote_code, self.gradient_checkpointing = trust_remote_code, gradient_checkpointing
        self.optimizer_factory = optimizer
        self._tokenizer = None
        self._checkpoint_schedule_steps = None

    def load_model(self, **kwargs):
        """The model as ``model_name`` names it, in ``dtype`` (:func:`dpo_lit.models.load_model`)."""
        return load_model(self.model_name, dtype=self.dtype_name, trust_remote_code=self.trust_remote_code, **kwargs)

    def trainable(self, model, task_type: str = "CAUSAL_LM"):
        """``model`` ready to train with this module's LoRA and checkpointing settings (:func:`trainable`)."""
        return trainable(model, self.lora, self.gradient_checkpointing, task_type)

    @property
    def tokenizer(self):
        """The model's tokenizer, loaded once and shared by the callbacks."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_name)
        return self._tokenizer

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates: the trained model's parameters that take gradients."""
        return [p for p in self.trained_model.parameters() if p.requires_grad]

    def configure_optimizers(self, total: int | None = None) -> dict:
        """The optimizer over :meth:`trained_parameters` and the schedule over ``total`` optimizer
        steps (None: one per batch, Lightning's estimate). A resumed run whose checkpoint planned a
        schedule of another length is warned about: the LR then follows the new length."""
        steps = int(self.trainer.estimated_stepping_batches if total is None else total)
        before, scheduler = self._checkpoint_schedule_steps, self.hparams.scheduler
        if before is not None and before != steps and not scheduler.startswith("constant"):
            rank_zero_warn(
                f"model.scheduler: the checkpoint's {scheduler} schedule was sized for {before} steps and "
                f"this run's for {steps}: from here the LR follows the new length, unlike an uninterrupted run"
            )
        self._schedule_steps = steps
        return optimizer_and_schedule(self, self.trained_parameters(), steps)

    def configure_model(self) -> None:
        """Under a sharding strategy (:class:`~dpo_lit.sharding.FSDP2Strategy`, which sets the device
        mesh), shard the trained model and every model kept beside it (:meth:`shard_models`);
        otherwise, and when they are sharded already (a validate after fit), nothing."""
        mesh = self._device_mesh
        if mesh is not None and not is_sharded(self.trained_model):
            self.shard_models(mesh["data_parallel"])

    @property
    def trained_model(self) -> torch.nn.Module:
        """The model this module trains and exports: the policy (a reward model's own, its backbone and head)."""
        return self.policy

    def shard_models(self, mesh) -> None:
        """Shard the trained model over ``mesh`` (:func:`~dpo_lit.sharding.shard`); a module that keeps
        other models (a reference copy, a value head) shards them too."""
        shard(self.trained_model, mesh)

    def fresh_model(self) -> torch.nn.Module:
        """A new, unsharded copy of the trained model's architecture (weights as loaded, adapter
        included), to load a gathered state dict into."""
        return self.trainable(self.load_model())

    def exportable_model(self) -> torch.nn.Module | None:
        """The trained model as one process can save it: itself, or under sharding its full weights
        gathered into :meth:`fresh_model` on rank 0 (None on the other ranks; every rank must call it)."""
        model = self.trained_model
        if not is_sharded(model):
            return model
        state = full_state_dict(model)
        if self.global_rank != 0:
            return None
        fresh = self.fresh_model()
        fresh.load_state_dict(state)
        return fresh

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["schedule_steps"] = getattr(self, "_schedule_steps", None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._checkpoint_schedule_steps = checkpoint.get("schedule_steps")
