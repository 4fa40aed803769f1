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
from torch import Tensor, nn
from torchmetrics import MeanMetric

from dpo_lit.data.sft import IGNORE_INDEX
from dpo_lit.logps import completion_states, head_outputs
from dpo_lit.policy import PolicyModule
from dpo_lit.reference import NoReference
from dpo_lit.sharding import in_forward


def _scored_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, scored: Tensor, packing: str) -> Tensor:
    states, targets, _ = completion_states(model, input_ids, attention_mask, scored, packing)
    return head_outputs(model, states, targets).logps


class SFTModule(PolicyModule):
    """Supervised fine-tuning: next-token cross-entropy on the completion tokens.

    Args:
        model_name: the policy: Hub name, local safetensors folder, ``.gguf`` file or alias
            (``smollm2-135m-instruct``, ``tiny-random-llama``); the tokenizer is linked to it.
        packing: how the rows meet the model (``prefix``, ``rows``, ``none``: :mod:`dpo_lit.packing`).
        fused_head: the loss from packed rows and the fused, chunked LM head (no tokens x
            vocabulary logits); False: the model's own forward and cross-entropy over padded rows,
            for a model whose head dpo-lit's log-probs do not reproduce.
        **kwargs: the trained model's settings (:class:`~dpo_lit.policy.PolicyModule`: ``lora``,
            ``optimizer``, ``scheduler``, ``warmup_ratio``, ...).
    """

    def __init__(
        self,
        model_name: str,
        packing: Literal["prefix", "rows", "none"] = "prefix",
        fused_head: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name, **kwargs)
        self.policy = self.trainable(self.load_model())
        self.val_loss = MeanMetric()  # weighted by loss tokens: the token mean over the validation set
        self.reference = NoReference()  # SampleTable shows the policy alone; KL: the LoRA base, if any

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
        logps = in_forward(self.policy, _scored_logps, batch["input_ids"], batch["attention_mask"], scored,
                           self.hparams.packing)  # (M,)  # fmt: skip
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
