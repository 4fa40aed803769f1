"""Capability-preservation evaluation: perplexity, LAMBADA and multiple-choice accuracy, lm-eval style.

- :mod:`~dpo_lit.evaluation.perplexity`: token-level perplexity of a long text in disjoint windows;
- :mod:`~dpo_lit.evaluation.multiple_choice`: log-likelihood scoring of choices, ``acc``/``acc_norm``;
- :mod:`~dpo_lit.evaluation.lambada`: last-word prediction, ``acc`` (greedy) and ``ppl``;
- :mod:`~dpo_lit.evaluation.tasks`: WikiText-2, ARC, PIQA, BoolQ, HellaSwag, LAMBADA and generic
  JSONL and text files as items or text with lm-evaluation-harness's prompts;
- :mod:`~dpo_lit.evaluation.evaluate`: any task by name, loaded once and scored by one call;
- :mod:`~dpo_lit.evaluation.scoring`: the batched forward passes they share.

The callback :class:`dpo_lit.callbacks.capability.CapabilityEval` runs them during training.
"""

from dpo_lit.evaluation.evaluate import TaskData, evaluate_task, load_task_data
from dpo_lit.evaluation.lambada import LambadaItem, evaluate_lambada
from dpo_lit.evaluation.multiple_choice import MCItem, evaluate_mc, mc_metrics, score_choices
from dpo_lit.evaluation.perplexity import PerplexityResult, load_text, perplexity
from dpo_lit.evaluation.tasks import TASKS, load_task, load_text_task

__all__ = [
    "TASKS",
    "LambadaItem",
    "MCItem",
    "PerplexityResult",
    "TaskData",
    "evaluate_lambada",
    "evaluate_mc",
    "evaluate_task",
    "load_task",
    "load_task_data",
    "load_text",
    "load_text_task",
    "mc_metrics",
    "perplexity",
    "score_choices",
]
