"""A reward model trained on preference pairs: a scalar head on the backbone, Bradley–Terry loss.

    dpo-lit fit --config configs/reward/tiny.yaml

The model is ``AutoModelForSequenceClassification`` with one label: the backbone's last hidden
state of each row's *last real token* (found from the attention mask, never from pad ids: for
SmolLM2 the pad is the EOS that ends every completion) goes through the linear ``score`` head.
Batches are :class:`~dpo_lit.data.PreferenceDataModule`'s (chosen rows, then rejected rows), and
the loss per pair is (Eisenstein et al. 2023 for the centring term)::

    -log σ(r_c - r_r - margin) + η · (r_c + r_r)²

The export (``<run>/reward_model``, and ``<run>/merged`` under LoRA with ``export.merge``) is read by
:class:`dpo_lit.rewards.RewardModel` wherever a reward is used: predict, onpolicy and PPO.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpo_lit.errors import ConfigError
from dpo_lit.models import load_tokenizer, resolve
from dpo_lit.policy import PolicyModule
from dpo_lit.sharding import in_forward


def load_reward_model(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """A sequence classifier with one output from a causal LM's weights (a fresh head) or from an
    exported reward model (its trained head)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "score.weight newly initialized": expected for a causal LM
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve(name), num_labels=1, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    finally:
        logging.set_verbosity(verbosity)
    tokenizer = load_tokenizer(name)
    model.config.pad_token_id = tokenizer.pad_token_id  # kept in the export; the pooling ignores it
    return model


def sequence_rewards(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """One scalar per row, (N,): the head applied to the last attended position of each row."""
    return in_forward(model, _last_position_scores, input_ids, attention_mask)


def _last_position_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: adapters stay on
    hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (attention_mask.bool() * positions).argmax(-1)  # (N,) works for left and right padding
    pooled = hidden[torch.arange(len(hidden), device=hidden.device), last]  # (N, H)
    return inner.score(pooled).squeeze(-1).float()


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: float = 0.0, center_coef: float = 0.0) -> Tensor:
    """Per-pair loss ``-log σ(r_c - r_r - margin) + center_coef · (r_c + r_r)²``, (B,)."""
    return -F.logsigmoid(chosen - rejected - margin) + center_coef * (chosen + rejected) ** 2


class RewardModule(PolicyModule):
    """Train a scalar reward model on preference pairs.

    Args:
        model_name: the backbone: Hub name, local folder, ``.gguf`` file or alias (usually the SFT
            model); the tokenizer is linked to it.
        margin: required reward difference (the loss is ``-log σ(r_c - r_r - margin)``).
        center_coef: η of the centring term ``η·(r_c + r_r)²`` that keeps rewards near 0 (0: off;
            Eisenstein et al. 2023 use 0.01).
        **kwargs: the trained model's settings (:class:`~dpo_lit.policy.PolicyModule`: ``lora``,
            which also trains the head, ``optimizer``, ``scheduler``, ``warmup_ratio``, ...).
    """

    def __init__(self, model_name: str, margin: float = 0.0, center_coef: float = 0.0, **kwargs: Any) -> None:
        super().__init__(model_name, **kwargs)
        if center_coef < 0:
            raise ConfigError(f"model.center_coef: must be >= 0, got {center_coef}")
        self.reward_model = self.fresh_model()

    @property
    def trained_model(self) -> nn.Module:
        return self.reward_model

    def fresh_model(self) -> nn.Module:
        model = load_reward_model(self.model_name, getattr(torch, self.dtype_name), self.trust_remote_code)
        return self.trainable(model, task_type="SEQ_CLS")

    def _step(self, batch: dict, split: str) -> Tensor:
        if "label" in batch:
            raise ConfigError("data.mode: the reward model trains on pairs; set data.mode: paired")
        rewards = sequence_rewards(self.reward_model, batch["input_ids"], batch["attention_mask"])  # (2B,)
        chosen, rejected = rewards.chunk(2)  # (B,) each
        loss = bradley_terry_loss(chosen, rejected, self.hparams.margin, self.hparams.center_coef).mean()
        size = len(chosen)
        self.log(f"{split}/loss", loss, batch_size=size, prog_bar=True)
        self.log(f"{split}/accuracy", (chosen > rejected).float().mean(), batch_size=size, prog_bar=split == "val")
        self.log(f"{split}/margin", (chosen - rejected).mean(), batch_size=size)
        self.log(f"{split}/reward_mean", rewards.mean(), batch_size=size)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

