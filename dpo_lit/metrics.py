"""Which way is better for each metric the project logs, in one table for every summary that picks
a best value (``dpo-lit sweep``) or calls a change a regression (:class:`~dpo_lit.callbacks.CapabilityEval`).

A metric is named by the last part of its tag (``cap/wikitext/bits_per_byte`` → ``bits_per_byte``).
Metrics without a direction — reward values of one side (``rewards/chosen``), log-probs, margins,
KTO's ``kto_z0``, lengths, standard errors, seconds — have no "best": a summary reports their final
value only, rather than guess.
"""

from __future__ import annotations

from typing import Literal

LOWER_IS_BETTER = frozenset({"loss", "nll", "ppl", "word_ppl", "perplexity", "word_perplexity", "bits_per_byte", "kl"})
HIGHER_IS_BETTER = frozenset({"acc", "acc_norm", "accuracies", "reward", "policy_reward", "paired_gain", "win_rate"})


def better(tag: str) -> Literal["higher", "lower"] | None:
    """``"lower"`` or ``"higher"`` for a metric whose direction is known (tag or bare name), else None."""
    name = tag.rsplit("/", 1)[-1]
    if name in LOWER_IS_BETTER:
        return "lower"
    if name in HIGHER_IS_BETTER:
        return "higher"
    return None
