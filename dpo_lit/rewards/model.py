"""A learned reward model as a reward: prompt and completion in, its scalar head's output out."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from dpo_lit.data.collate import pad_rows
from dpo_lit.data.prompts import encode_prompts
from dpo_lit.data.tokenize import encode_texts
from dpo_lit.errors import MissingFileError
from dpo_lit.rewards.base import Reward


class RewardModel(Reward):
    """Scores with a reward model trained by :class:`dpo_lit.rlhf.RewardModule` (or any
    one-label ``AutoModelForSequenceClassification``).

    Each completion is scored as the model was trained on on-policy pairs: the prompt rendered
    as the data pipeline renders prompts (chat template when the tokenizer has one), then the
    completion's tokens, then the EOS when the completion ``finished``.

    Args:
        path: the exported model folder (``<run>/merged``, or ``<run>/policy`` after full
            fine-tuning), or a LoRA adapter folder (merged on load).
        batch_size: completions scored per forward pass.
        chat: render prompts with the chat template (None: when the tokenizer has one).
        device: where the model runs (``cpu``, ``cuda``).
    """

    def __init__(self, path: str, batch_size: int = 16, chat: bool | None = None, device: str = "cpu") -> None:
        if not Path(path).expanduser().is_dir():
            raise MissingFileError(f"model.reward.init_args.path: reward model folder not found: {path}")
        self.path, self.batch_size, self.chat, self.device = path, batch_size, chat, device

    @cached_property
    def model(self) -> torch.nn.Module:
        from dpo_lit.rlhf.reward_model import load_reward_model

        if (Path(self.path) / "adapter_config.json").is_file():
            from peft import AutoPeftModelForSequenceClassification

            model = AutoPeftModelForSequenceClassification.from_pretrained(self.path, num_labels=1).merge_and_unload()
        else:
            model = load_reward_model(self.path)
        return model.to(self.device).eval().requires_grad_(False)

    @cached_property
    def tokenizer(self):
        from dpo_lit.models import load_tokenizer

        return load_tokenizer(self.path)

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str], finished: Sequence[bool] | None) -> Tensor:
        from dpo_lit.rlhf.reward_model import sequence_rewards

        eos = self.tokenizer.eos_token_id
        done = [True] * len(completions) if finished is None else list(finished)  # unknown: scored as ended
        prompt_ids = encode_prompts(self.tokenizer, prompts, self.chat)
        completion_ids = encode_texts(self.tokenizer, completions, special=False)
        rows = [p + c + ([eos] if d else []) for p, c, d in zip(prompt_ids, completion_ids, done)]
        scores = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask, _ = pad_rows(rows[start : start + self.batch_size], self.tokenizer.pad_token_id)
            scores.append(sequence_rewards(self.model, ids.to(self.device), mask.to(self.device)))
        return torch.cat(scores).cpu() if scores else torch.zeros(0)
