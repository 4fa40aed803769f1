"""PreferenceModule: a trainable policy, a frozen reference and a pluggable loss object.

The module computes; it never asks which loss it holds. Each step runs one forward pass of the
policy over the chosen and rejected rows of the batch (:func:`dpo_lit.logps.completion_logps`),
asks the reference strategy for the same rows' reference log-probs, lets the loss turn the rows
into its container (``loss.logps_from_rows``) and evaluates it (``loss(logps)``). Everything the loss
returns is logged as ``split/name``; callbacks do the rest of the monitoring.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric

from dpo_lit.errors import ConfigError
from dpo_lit.logps import completion_logps, reference_options
from dpo_lit.losses import DPOLoss, LossOutput, PreferenceLoss
from dpo_lit.policy import PolicyModule
from dpo_lit.reference import SHORTCUTS, NoReference, Reference
from dpo_lit.sharding import shard


class PreferenceModule(PolicyModule):
    """Preference optimisation of a causal LM.

    Args:
        model_name: the policy: Hub name, local safetensors folder, ``.gguf`` file or alias
            (``smollm2-135m-instruct``, ``tiny-random-llama``); the tokenizer is linked to it.
        loss: the objective, chosen by ``class_path`` (DPOLoss, IPOLoss, KTOLoss, SimPOLoss, ...).
        reference: where reference log-probs come from, an object chosen by ``class_path``
            (a :class:`~dpo_lit.reference.Reference`: CopyReference, AdapterReference,
            PrecomputedReference, NoReference, SyncedReference) or a shortcut: ``copy`` (frozen
            copy), ``adapter`` (the policy with LoRA disabled), ``precomputed`` (once before training, cached on disk),
            ``none``. Reference-free losses always use none.
        logps_chunk: rows of completion logits computed at once (memory vs speed; None: as many as
            make 2**25 logits, 261 rows of a 128k vocabulary).
        fused_head: compute the policy's LM head and log-softmax chunk by chunk in the forward and
            again in the backward, never holding (tokens × vocabulary) logits
            (:func:`dpo_lit.logps.head_outputs`); False keeps the logits for the backward (the
            references always run chunk by chunk: they need no backward).
        packing: how a batch's rows meet the model (:mod:`dpo_lit.packing`): ``prefix`` (default)
            packs their real tokens into one sequence without padding and computes the prompt a
            chosen and a rejected row share once; ``rows`` packs without sharing; ``none`` runs
            the padded rows. The log-probs are the same up to floating-point rounding.
        **kwargs: the trained model's settings, shared by every module (:class:`~dpo_lit.policy.PolicyModule`:
            ``lora``, ``optimizer``, ``scheduler``, ``warmup_ratio``, ``scheduler_kwargs``, ``dtype``,
            ``trust_remote_code``, ``gradient_checkpointing``).
    """

    hparams_ignore = ("loss", "reference")  # objects: rebuilt from the config, their state in the checkpoint

    def __init__(
        self,
        model_name: str,
        loss: PreferenceLoss = lazy_instance(DPOLoss, beta=0.1),
        reference: Reference | Literal["copy", "adapter", "precomputed", "none"] = "copy",
        logps_chunk: int | None = None,
        fused_head: bool = True,
        packing: Literal["prefix", "rows", "none"] = "prefix",
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name, **kwargs)
        self.loss = loss
        if isinstance(reference, str):
            if reference not in SHORTCUTS:
                raise ConfigError(f"model.reference: unknown shortcut {reference!r}; expected one of {sorted(SHORTCUTS)}")
            reference = SHORTCUTS[reference]()
        if self.loss.needs_reference and type(reference) is NoReference:
            raise ConfigError(
                f"model.reference: {type(self.loss).__name__} needs a reference model: set it to copy, adapter "
                "or precomputed"
            )
        if not self.loss.needs_reference and type(reference) is not NoReference:
            rank_zero_info(f"{type(self.loss).__name__} is reference-free: no reference model is used")
            reference = NoReference()
        self.policy = self.load_model()
        self.reference = reference
        # Before the adapter: a copy is of the weights as loaded.
        reference.setup(
            self.policy, lora=self.lora is not None, paired=loss.data_mode == "paired", chunk=logps_chunk,
            options=reference_options(loss.logps_options), packing=packing, initial=self.load_model,
        )
        self.policy = self.trainable(self.policy)
        self.val_metrics = torch.nn.ModuleDict()

    # ---- the computation -------------------------------------------------------------------

    def forward_batch(self, batch: dict, split: str) -> tuple[LossOutput, dict[str, Tensor]]:
        """Loss and per-example metric values for one collated batch."""
        policy_rows, tokens = completion_logps(
            self.policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
            self.hparams.logps_chunk, self.loss.logps_options, self.hparams.packing, self.hparams.fused_head,
        )  # (2B,) or, if the loss asks for an extra column, (2B, 2); (2B,)
        ref_rows = self.reference.logps(self.policy, batch, split)
        logps = self.loss.logps_from_rows(policy_rows, ref_rows, tokens, batch)
        out = self.loss(logps)
        values = {
            "loss": out.losses.detach(),
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": out.margins,
            "rewards/accuracies": out.accuracies,
            **logps.logp_metrics(),
            **out.metrics,
        }
        return out, {k: v.detach().float().reshape(-1) for k, v in values.items() if v is not None}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out, values = self.forward_batch(batch, "train")
        batch_size = len(batch["index"])
        for name, value in values.items():
            if value.numel():
                self.log(f"train/{name}", value.mean(), batch_size=batch_size, prog_bar=name == "loss")
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        _, values = self.forward_batch(batch, "val")
        for name, value in values.items():
            key = name.replace("/", "__")
            if key not in self.val_metrics:
                self.val_metrics[key] = MeanMetric().to(self.device)
            if value.numel():
                self.val_metrics[key].update(value)
                self.log(
                    f"val/{name}", self.val_metrics[key], metric_attribute=f"val_metrics.{key}",
                    prog_bar=name in ("loss", "rewards/accuracies"),
                )

    # ---- hooks -----------------------------------------------------------------------------

    def _planned(self, split: str, n: int) -> list[int] | None:
        """The examples of ``split`` this run will use, when the trainer's limits say (None: all).

        Training: ``max_steps`` x ``accumulate_grad_batches`` batches, at most ``limit_train_batches``
        of each epoch, in the data module's order; validation: the first ``limit_val_batches``.
        A run of 2 steps on 1000 pairs so computes reference log-probs for a few dozen.
        """
        trainer, datamodule = self.trainer, self.trainer.datamodule
        if split == "val":  # under DDP, each rank's first batches of a DistributedSampler over the split
            limit, size = trainer.limit_val_batches, datamodule.eval_batch_size * trainer.world_size
            batches = limit if isinstance(limit, int) else math.ceil(limit * math.ceil(n / size))
            return list(range(min(n, batches * size)))
        if trainer.max_steps is None or trainer.max_steps < 0 or not hasattr(datamodule, "train_indices"):
            return None
        limit = trainer.limit_train_batches
        per_epoch = limit if isinstance(limit, int) else math.ceil(limit * math.ceil(n / datamodule.batch_size))
        return datamodule.train_indices(trainer.max_steps * trainer.accumulate_grad_batches, per_epoch)

    def _prepare_reference(self, splits: list[str]) -> None:
        datamodule = self.trainer.datamodule
        data = {
            split: (
                dataset,
                lambda indices, split=split: datamodule.ordered_dataloader(split, indices),
                self._planned(split, len(dataset)),
            )
            for split in splits
            if (dataset := getattr(datamodule, f"{split}_dataset", None))
        }
        trainer = self.trainer
        self.reference.prepare(
            self.policy, data, self.device, trainer.precision_plugin.forward_context, str(trainer.precision),
            trainer.strategy, trainer.precision_plugin.convert_module,
        )

    def setup(self, stage: str) -> None:
        mode = getattr(self.trainer.datamodule, "mode", None)
        if mode is not None and mode != self.loss.data_mode:
            raise ConfigError(
                f"data.mode: {type(self.loss).__name__} trains on {self.loss.data_mode} examples but data.mode is "
                f"{mode}; set --data.mode {self.loss.data_mode}"
            )

    def on_fit_start(self) -> None:
        self._prepare_reference(["train", "val"])

    def on_validation_start(self) -> None:
        self._prepare_reference(["val"])

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self.reference.after_step(self.policy, self.trainer.global_step)

    def shard_models(self, mesh) -> None:
        super().shard_models(mesh)
        self.reference.shard(lambda model: shard(model, mesh))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["reference"] = self.reference.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.reference.load_state_dict(checkpoint.get("reference", {}))
