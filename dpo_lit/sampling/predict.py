"""``dpo-lit predict``'s module, data and writer: sample k completions per prompt, score them, pair them.

    dpo-lit predict --config configs/generate/everyday_vader.yaml

The prompts come from a file (plain lines or JSONL with a ``prompt`` field; chat-templated when
the model has a template). The reward is an object chosen by ``class_path`` (a lexicon sentiment
scorer, a length/format rule, or your own :class:`dpo_lit.rewards.Reward`). Pairs are written as
JSONL in the ``tokenized`` data format: texts and scores for reading, and the token ids exactly as
sampled for training, so a completion cut by ``max_new_tokens`` never gains an EOS it did not
produce. ``dpo-lit fit`` trains on that file as it is.

Each prompt is sampled from its own seed (:func:`prompt_seed`), so its samples do not depend on
its batch or on how many processes share the prompts: under DDP each process samples its share,
and rank 0 alone writes every prompt's pairs, in the prompts file's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from jsonargparse import lazy_instance
from lightning import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from dpo_lit.data.io import DataSource, write_json, write_jsonl
from dpo_lit.data.prompts import encode_prompts, read_prompts
from dpo_lit.models import load_model, load_tokenizer
from dpo_lit.rewards import Reward, VaderSentiment
from dpo_lit.sampling.pairs import PairStats, build_pairs
from dpo_lit.sampling.sample import derived_seed, sample


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of the prompt at ``index`` in the prompts file: a function of the run's
    seed and the index only, so a prompt gets the same samples in whatever process, batch or batch
    position it lands."""
    return derived_seed(seed, index)


@dataclass
class PromptPairs:
    """What ``predict`` made of one prompt.

    Attributes:
        index: The prompt's position in the prompts file.
        rows: Its pairs (see :mod:`dpo_lit.sampling.pairs`).
        scores: The reward of each of its samples, in sample order.
        finished: Whether each sample ended with the EOS.
        stats: What :func:`build_pairs` made and skipped for it.
    """

    index: int
    rows: list[dict]
    scores: list[float]
    finished: list[bool]
    stats: PairStats


def gather_on_rank_zero(results: list[PromptPairs]) -> list[PromptPairs] | None:
    """Every process's results on rank 0, one per prompt, in prompt order; None on other ranks.

    A distributed sampler that pads its shares repeats prompts: the first result of an index is kept.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(results, parts, dst=0)
        if parts is None:
            return None
        results = [r for part in parts for r in part]
    unique: dict[int, PromptPairs] = {}
    for result in results:
        unique.setdefault(result.index, result)
    return [unique[index] for index in sorted(unique)]


class GenerationModule(LightningModule):
    """Samples completions from a model and pairs them by reward.

    Args:
        model_name: the sampling model: Hub name, local folder, ``.gguf`` file or alias.
        reward: scores each completion (``class_path``: VaderSentiment, LengthReward, ...).
        num_samples: completions sampled per prompt.
        max_new_tokens: bound on completion tokens (a cut completion keeps no EOS).
        temperature: sampling temperature.
        top_p: nucleus sampling threshold (1: off).
        strategy: ``best_worst`` (one pair per prompt) or ``all_pairs`` (every differently scored two).
        min_margin: skip pairs whose reward difference is below this.
        seed: sampling seed; each prompt samples from :func:`prompt_seed` of it and the prompt's
            index, whatever the batch size or the number of processes.
        batch_size: rows (prompt × sample) per ``generate`` call; each row draws from a generator
            of its own (:class:`~dpo_lit.sampling.sample.RowDraws`), so the batching changes no sample.
        dtype: dtype of the loaded weights.
    """

    def __init__(
        self,
        model_name: str,
        reward: Reward = lazy_instance(VaderSentiment),
        num_samples: int = 4,
        max_new_tokens: int = 48,
        temperature: float = 1.0,
        top_p: float = 1.0,
        strategy: Literal["best_worst", "all_pairs"] = "best_worst",
        min_margin: float = 0.0,
        seed: int = 0,
        batch_size: int = 16,
        dtype: Literal["float32", "bfloat16"] = "float32",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["reward"])
        self.reward = reward
        self.policy = load_model(model_name, dtype=dtype)
        self.tokenizer = load_tokenizer(model_name)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, list[PromptPairs]]:
        h = self.hparams
        seeds = [prompt_seed(h.seed, index) for index in batch["indices"]]
        samples = sample(
            self.policy, self.tokenizer, batch["prompt_ids"], h.num_samples, h.max_new_tokens,
            temperature=h.temperature, top_p=h.top_p, batch_size=h.batch_size, seed=seeds[0], prompt_seeds=seeds,
        )  # greedy decoding (temperature 0) draws nothing: the same tokens in any batch
        prompts = [batch["prompts"][s.prompt_index] for s in samples]  # whole: a reward model reads conversations
        scores = [float(x) for x in self.reward(prompts, [s.text for s in samples], [s.finished for s in samples])]
        results = []
        for position, index in enumerate(batch["indices"]):
            mine = [k for k, s in enumerate(samples) if s.prompt_index == position]
            rows, stats = build_pairs(
                [samples[k] for k in mine], [scores[k] for k in mine], batch["prompts"], h.strategy, h.min_margin
            )
            results.append(PromptPairs(index, rows, [scores[k] for k in mine], [samples[k].finished for k in mine], stats))
        return {"prompts": results}


class PromptDataModule(LightningDataModule):
    """Prompts from a file, encoded as the model will see them: ``predict``'s input, and PPO's
    training (shuffled) and validation prompts.

    Args:
        tokenizer_name: linked from ``model.model_name``.
        prompts_file: plain text (one prompt a line) or JSONL with a ``prompt`` field.
        batch_size: prompts per batch.
        limit: use only the first ``limit`` prompts.
        chat: render with the chat template (None: when the tokenizer has one).
        val_prompts_file: held-out prompts for validation (None: no validation).
        val_limit: use only the first ``val_limit`` held-out prompts.
    """

    def __init__(
        self, tokenizer_name: str, prompts_file: DataSource, batch_size: int = 8, limit: int | None = None,
        chat: bool | None = None, val_prompts_file: DataSource | None = None, val_limit: int | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer_name, self.prompts_file = tokenizer_name, prompts_file
        self.batch_size, self.limit, self.chat = batch_size, limit, chat
        self.val_prompts_file, self.val_limit = val_prompts_file, val_limit
        self.items: list[dict[str, Any]] = []
        self.val_items: list[dict[str, Any]] = []

    def _encode(self, path: str, limit: int | None) -> list[dict[str, Any]]:
        prompts = read_prompts(path)[:limit]
        ids = encode_prompts(load_tokenizer(self.tokenizer_name), prompts, self.chat)
        return [{"index": k, "prompt": p, "prompt_ids": i} for k, (p, i) in enumerate(zip(prompts, ids))]

    def setup(self, stage: str | None = None) -> None:
        self.items = self._encode(self.prompts_file, self.limit)
        if self.val_prompts_file:
            self.val_items = self._encode(self.val_prompts_file, self.val_limit)

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, list]:
        return {
            "indices": [i["index"] for i in items], "prompts": [i["prompt"] for i in items],
            "prompt_ids": [i["prompt_ids"] for i in items],
        }

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=self.batch_size, shuffle=True, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_items, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate)


class WritePairs(BasePredictionWriter):
    """Write the pairs of a ``predict`` run as JSONL, with a summary beside them.

    Under DDP every process hands its prompts' pairs to rank 0, which alone writes them all, in
    the prompts file's order.

    Args:
        path: the pairs file; ``<path stem>.summary.json`` gets the counts and reward statistics.
    """

    def __init__(self, path: str = "pairs.jsonl") -> None:
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions, batch_indices) -> None:
        outputs = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        results = gather_on_rank_zero([result for out in outputs for result in out["prompts"]])
        if results is None:  # not rank 0
            return
        rows = [row for r in results for row in r.rows]
        scores = torch.tensor([score for r in results for score in r.scores])
        finished = [f for r in results for f in r.finished]
        stats = PairStats(prompts=0)
        for r in results:
            for key, value in vars(r.stats).items():
                setattr(stats, key, getattr(stats, key) + value)
        replaced = Path(self.path).exists()
        path = write_jsonl(rows, self.path)
        summary = {
            "pairs": len(rows), **vars(stats), "samples": len(finished),
            "reward_mean": scores.mean().item(), "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "finished_fraction": sum(finished) / max(1, len(finished)),
        }
        write_json(summary, Path(path).with_suffix(".summary.json"))
        rank_zero_info(
            f"{'Replaced' if replaced else 'Wrote'} {len(rows)} pairs from {stats.prompts} prompts to {path} (reward {summary['reward_mean']:.3f} "
            f"± {summary['reward_std']:.3f} over {len(finished)} samples, {summary['finished_fraction']:.0%} "
            f"ended with EOS; skipped: {stats.ties} ties, {stats.under_margin} under the margin)"
            + (" — the file held an earlier run's pairs; --output.path writes elsewhere" if replaced else "")
        )
