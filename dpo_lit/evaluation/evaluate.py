"""Any task by name: load it once (:func:`load_task_data`), score a model on it (:func:`evaluate_task`).

=======  ==============================================  ========================================
kind     tasks                                           metrics
=======  ==============================================  ========================================
text     ``wikitext``, a ``.txt`` file                   ``ppl``, ``word_ppl``, ``bits_per_byte``
mc       ARC, PIQA, BoolQ, HellaSwag, a ``.jsonl`` file  ``acc``, ``acc_norm``
lambada  ``lambada``                                     ``acc``, ``ppl``
=======  ==============================================  ========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from dpo_lit.evaluation.lambada import LambadaItem, evaluate_lambada
from dpo_lit.evaluation.multiple_choice import MCItem, evaluate_mc
from dpo_lit.evaluation.perplexity import perplexity
from dpo_lit.evaluation.tasks import TaskKind, load_task, load_text_task, task_kind, task_name


@dataclass(frozen=True)
class TaskData:
    """A loaded task.

    Args:
        name: its metric name (the registry name, or a file's stem).
        kind: ``text``, ``mc`` or ``lambada`` (see the module docstring).
        data: the text (``text``) or the items.
    """

    name: str
    kind: TaskKind
    data: str | list[MCItem] | list[LambadaItem]


def load_task_data(
    task: str, limit: int | None = None, seed: int = 0, path: str | Path | None = None
) -> TaskData:
    """Load a registered task or a ``.jsonl``/``.txt`` file.

    Args:
        task: a name from :data:`~dpo_lit.evaluation.tasks.TASKS` or a file's path.
        limit: items kept of an item task (a seeded random subset; None: all); texts are whole.
        seed: seed of the subset.
        path: read this file instead of the task's default one.
    """
    kind = task_kind(task)
    data = load_text_task(task, path) if kind == "text" else load_task(task, path, limit, seed)
    return TaskData(task_name(task), kind, data)


def evaluate_task(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskData,
    batch_size: int = 8,
    perplexity_tokens: int | None = None,
    context_length: int = 512,
) -> dict[str, float]:
    """The metrics of ``model`` on ``task`` (see the module docstring), in eval mode without gradients.

    Args:
        model: a causal LM; its training modes are restored after.
        tokenizer: the model's tokenizer.
        task: from :func:`load_task_data`.
        batch_size: sequences per forward pass.
        perplexity_tokens: tokens of a text scored (None: the whole text); text tasks only.
        context_length: tokens per perplexity window; text tasks only.
    """
    if task.kind == "text":
        result = perplexity(model, tokenizer, task.data, perplexity_tokens, context_length, batch_size)
        return {"ppl": result.ppl, "word_ppl": result.word_ppl, "bits_per_byte": result.bits_per_byte}
    if task.kind == "lambada":
        metrics = evaluate_lambada(model, tokenizer, task.data, batch_size)
        return {"acc": metrics["acc"], "ppl": metrics["ppl"]}
    metrics = evaluate_mc(model, tokenizer, task.data, batch_size)
    return {"acc": metrics["acc"], "acc_norm": metrics["acc_norm"]}
