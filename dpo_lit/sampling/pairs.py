"""Scored samples → preference pairs in the ``tokenized`` data format (written with ``data.io.write_jsonl``).

Each row keeps the texts for reading and the token ids exactly as sampled for training (the data
pipeline trains on ``prompt_ids``/``chosen_ids``/``rejected_ids`` as given: no re-tokenisation,
no EOS appended to a completion that ``max_new_tokens`` cut)::

    {"prompt": <as given: str or messages>, "chosen": str, "rejected": str,
     "chosen_score": float, "rejected_score": float,
     "chosen_finished": bool, "rejected_finished": bool,
     "prompt_ids": [int], "chosen_ids": [int], "rejected_ids": [int]}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from dpo_lit.sampling.sample import Sample

Strategy = Literal["best_worst", "all_pairs"]


@dataclass
class PairStats:
    """What :func:`build_pairs` made and skipped.

    Attributes:
        prompts: Prompts with at least one sample.
        pairs: Pairs made.
        ties: Candidate pairs skipped because both scores were equal.
        under_margin: Candidate pairs skipped because the score difference was below ``min_margin``.
        prompts_without_pair: Prompts that gave no pair at all.
    """

    prompts: int = 0
    pairs: int = 0
    ties: int = 0
    under_margin: int = 0
    prompts_without_pair: int = 0


def _candidates(order: list[int], strategy: Strategy) -> list[tuple[int, int]]:
    """(higher, lower) sample positions of one prompt; ``order`` is sorted by descending score."""
    if strategy == "best_worst":
        return [(order[0], order[-1])] if len(order) > 1 else []
    if strategy == "all_pairs":
        return [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]
    raise ValueError(f"strategy must be 'best_worst' or 'all_pairs', got {strategy!r}")


def _row(prompt: Any, chosen: Sample, rejected: Sample, scores: list[float], c: int, r: int) -> dict:
    return {
        "prompt": prompt,
        "chosen": chosen.text,
        "rejected": rejected.text,
        "chosen_score": scores[c],
        "rejected_score": scores[r],
        "chosen_finished": chosen.finished,
        "rejected_finished": rejected.finished,
        "prompt_ids": list(chosen.prompt_ids),
        "chosen_ids": list(chosen.completion_ids),
        "rejected_ids": list(rejected.completion_ids),
    }


def build_pairs(
    samples: Sequence[Sample],
    scores: Tensor | Sequence[float],
    prompts_text: Sequence[Any],
    strategy: Strategy = "best_worst",
    min_margin: float = 0.0,
) -> tuple[list[dict], PairStats]:
    """Pair the samples of each prompt by their scores.

    Args:
        samples: Samples of any number of prompts (grouped by ``prompt_index``, in any order).
        scores: One score per sample, (N,).
        prompts_text: The prompts as given (strings or message lists), indexed by ``prompt_index``;
            copied into each row's ``prompt``.
        strategy: ``best_worst``: one pair per prompt, the highest-scored sample against the
            lowest (the first in sample order wins ties for either place); ``all_pairs``: every
            two samples with different scores, the higher as chosen.
        min_margin: Candidate pairs whose score difference is below this are skipped. Equal
            scores are always skipped (counted as ties), whatever the margin.

    Returns:
        The rows (see the module docstring), in prompt order, and what was made and skipped.
    """
    scores = [float(s) for s in scores]
    if len(scores) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(scores)} scores")
    groups: dict[int, list[int]] = {}
    for position, s in enumerate(samples):
        groups.setdefault(s.prompt_index, []).append(position)
    rows: list[dict] = []
    stats = PairStats(prompts=len(groups))
    for index in sorted(groups):
        order = sorted(groups[index], key=lambda k: -scores[k])  # stable: sample order breaks ties
        made = 0
        for c, r in _candidates(order, strategy):
            margin = scores[c] - scores[r]
            if margin == 0:
                stats.ties += 1
            elif margin < min_margin:
                stats.under_margin += 1
            else:
                rows.append(_row(prompts_text[index], samples[c], samples[r], scores, c, r))
                made += 1
        stats.pairs += made
        stats.prompts_without_pair += made == 0
    return rows, stats
