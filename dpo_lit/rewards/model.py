"""A learned reward model as a reward: prompt and completion in, its scalar head's output out."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from dpo_lit.data.collate import pad_rows
from dpo_lit.data.formats import UnpairedExample
from dpo_lit.data.prompts import Prompt, encode_prompts
from dpo_lit.data.tokenize import encode_texts, tokenize_examples
from dpo_lit.errors import MissingFileError
from dpo_lit.rewards.base import Reward


def conversation_rows(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[list[dict[str, str]]], completions: Sequence[str]
) -> list[list[int]]:
    """Token ids of finished completions of conversations, exactly as a reward model is trained on
    them: each pair goes through the data pipeline as a ``conversational`` record's (prompt, one
    assistant message) would, so the chat template renders the whole conversation and the answer
    (a template that trims or rewrites content does so here too) and the answer ends at its EOS."""
    examples = [
        UnpairedExample(list(p), [{"role": "assistant", "content": c}], True, "reward")
        for p, c in zip(conversations, completions)
    ]
    tokenized = tokenize_examples(examples, tokenizer, max_length=sys.maxsize, max_prompt_length=None)
    return [t["prompt_ids"] + t["completion_ids"] for t in tokenized]


def reward_rows(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    completions: Sequence[str],
    finished: Sequence[bool],
    chat: bool | None,
) -> list[list[int]]:
    """Token ids of each prompt + completion as :class:`RewardModel` scores them (see there)."""
    eos = tokenizer.eos_token_id
    conversation = [not isinstance(p, str) and f and chat is not False for p, f in zip(prompts, finished)]
    rest = [i for i, c in enumerate(conversation) if not c]
    prompt_ids = encode_prompts(tokenizer, [prompts[i] for i in rest], chat)
    completion_ids = encode_texts(tokenizer, [completions[i] for i in rest], special=False)
    rows: list[list[int]] = [[] for _ in prompts]
    for i, p, c in zip(rest, prompt_ids, completion_ids):
        rows[i] = p + c + ([eos] if finished[i] else [])
    talks = [i for i, c in enumerate(conversation) if c]
    talk_rows = conversation_rows(tokenizer, [prompts[i] for i in talks], [completions[i] for i in talks])
    for i, row in zip(talks, talk_rows):
        rows[i] = row
    return rows


class RewardModel(Reward):
    """Scores with a reward model trained by :class:`dpo_lit.rlhf.RewardModule` (or any
    one-label ``AutoModelForSequenceClassification``).

    Each completion is scored as the model was trained:

    - a conversation (a message-list prompt) with a finished completion: the whole conversation
      and the completion as the assistant's next message, tokenised by the data pipeline as a
      ``conversational`` preference record is (:func:`conversation_rows`);
    - a string prompt: rendered as the data pipeline renders prompts of on-policy pairs (chat
      template when the tokenizer has one and ``chat`` is not false), then the completion's
      tokens, then the EOS when the completion ``finished``;
    - an unfinished completion of a conversation: the rendered conversation, then the
      completion's tokens, without an EOS (the model never ended it).

    Callers must pass conversations whole (:attr:`Reward.reads_conversations`): a prompt reduced
    to its last message's text is scored as a one-message conversation.

    Args:
        path: the exported model folder (``<run>/merged``, or ``<run>/reward_model`` after full
            fine-tuning), or a LoRA adapter folder (merged on load).
        batch_size: completions scored per forward pass.
        chat: render prompts with the chat template (None: when the tokenizer has one).
        device: where the model runs (``cpu``, ``cuda``).
    """

    reads_conversations = True

    def __init__(self, path: str, batch_size: int = 16, chat: bool | None = None, device: str = "cpu") -> None:
        if not Path(path).expanduser().is_dir():
            raise MissingFileError(f"model.reward.init_args.path: reward model folder not found: {path}")
        self.path, self.batch_size, self.chat, self.device = path, batch_size, chat, device

    @cached_property
    def model(self) -> torch.nn.Module:
        from dpo_lit.rlhf.reward_model import load_reward_model

        if (Path(self.path) / "adapter_config.json").is_file():  # a LoRA export: its base, as dpo-lit names models
            from peft import PeftConfig, PeftModel

            base = PeftConfig.from_pretrained(self.path).base_model_name_or_path  # alias, Hub name or folder
            model = PeftModel.from_pretrained(load_reward_model(base), self.path).merge_and_unload()
        else:
            model = load_reward_model(self.path)
        return model.to(self.device).eval().requires_grad_(False)

    @cached_property
    def tokenizer(self):
        from dpo_lit.models import load_tokenizer

        return load_tokenizer(self.path)

    @torch.no_grad()
    def score(self, prompts: list[Prompt], completions: list[str], finished: Sequence[bool] | None) -> Tensor:
        from dpo_lit.rlhf.reward_model import sequence_rewards

        done = [True] * len(completions) if finished is None else list(finished)  # unknown: scored as ended
        rows = reward_rows(self.tokenizer, prompts, completions, done, self.chat)
        scores = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask, _ = pad_rows(rows[start : start + self.batch_size], self.tokenizer.pad_token_id)
            scores.append(sequence_rewards(self.model, ids.to(self.device), mask.to(self.device)))
        return torch.cat(scores).cpu() if scores else torch.zeros(0)
