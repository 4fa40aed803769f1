"""SFTModule: supervised fine-tuning of a causal LM on demonstrations, stage 1 of RLHF.

The loss is the mean token cross-entropy over a batch's loss tokens (``labels`` other than -100,
from :class:`~dpo_lit.data.SFTDataModule`: a completion, or the whole of a plain text). Validation
reports the token-mean loss over the whole validation set (not a mean of per-batch means) and its
exponential, the perplexity. The trained policy is exported by
:class:`~dpo_lit.callbacks.ExportPretrained` (``merge: true`` with LoRA), ready to be the
``model_name`` of the next stage.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric

from dpo_lit.data.sft import IGNORE_INDEX
from dpo_lit.logps import completion_states, head_outputs
from dpo_lit.models import load_model, load_tokenizer
from dpo_lit.policy import LoRASettings, optimizer_and_schedule, trainable
from dpo_lit.reference import NoReference


class SFTModule(LightningModule):
    """Supervised fine-tuning: next-token cross-entropy on the completion tokens.

    Args:
        model_name: the policy: Hub name, local safetensors folder, ``.gguf`` file or alias
            (``smollm2-135m-instruct``, ``tiny-random-llama``); the tokenizer is linked to it.
        lora: train a LoRA adapter instead of all weights (None: full fine-tuning).
        optimizer: optimizer class and its arguments (``lr`` among them).
        scheduler: learning-rate schedule by its ``transformers`` name (``linear``, ``cosine``,
            ``constant_with_warmup``, ...; ``transformers.get_scheduler``), stepped every optimizer
            step and named ``train/lr`` for ``LearningRateMonitor``.
        warmup_ratio: fraction of the optimizer steps spent warming up linearly from 0.
        scheduler_kwargs: further arguments of that schedule (e.g. ``num_cycles``).
        dtype: dtype of the loaded weights (use ``trainer.precision`` for mixed precision).
        trust_remote_code: allow the Hub model's own Python code to run (off unless asked).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        packing: how the rows meet the model (``prefix``, ``rows``, ``none``: :mod:`dpo_lit.packing`).
        fused_head: the loss from packed rows and the fused, chunked LM head (no tokens x
            vocabulary logits); False: the model's own forward and cross-entropy over padded rows,
            for a model whose head dpo-lit's log-probs do not reproduce.
    """

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
        packing: Literal["prefix", "rows", "none"] = "prefix",
        fused_head: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.policy = load_model(model_name, dtype=dtype, trust_remote_code=trust_remote_code)
        self.policy = trainable(self.policy, lora, gradient_checkpointing)
        self.val_loss = MeanMetric()  # weighted by loss tokens: the token mean over the validation set
        self.reference = NoReference()  # SampleTable shows the policy alone; KL: the LoRA base, if any
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The policy's tokenizer, loaded once and shared by the callbacks."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.model_name)
        return self._tokenizer

    def forward_batch(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The mean cross-entropy over the batch's loss tokens, and how many there are.

        The rows are packed without padding and the LM head runs chunk by chunk over the loss
        tokens only (:func:`dpo_lit.logps.head_outputs`): no (tokens × vocabulary) logits.
        """
        labels = batch["labels"]  # (B, T), unshifted: the model predicts labels[:, 1:]
        if not self.hparams.fused_head:
            out = self.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
            return out.loss, (labels[:, 1:] != IGNORE_INDEX).sum()
        scored = labels != IGNORE_INDEX  # (B, T); the labels are the input ids there
        states, targets, _ = completion_states(
            self.policy, batch["input_ids"], batch["attention_mask"], scored, self.hparams.packing
        )
        logps = head_outputs(self.policy, states, targets).logps  # (M,)
        return -logps.mean(), torch.tensor(len(logps), device=logps.device)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self.forward_batch(batch)
        self.log("train/loss", loss.detach(), batch_size=len(batch["input_ids"]), prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, tokens = self.forward_batch(batch)
        self.val_loss.update(loss.detach(), tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", loss.exp())

    def configure_optimizers(self):
        return optimizer_and_schedule(self, [p for p in self.policy.parameters() if p.requires_grad])
