"""The evaluation data sets as :class:`MCItem` lists (or a text), with lm-evaluation-harness prompts.

=============  ===============================  =========================================================
task           mirror file (Hub split below)    prompt → choices
=============  ===============================  =========================================================
wikitext       ``wiki.test.raw``                text for :func:`~dpo_lit.evaluation.perplexity.perplexity`,
                                                with lm-eval's ``wikitext_detokenizer`` applied
arc_easy       ``ARC-Easy-Test.jsonl``          ``Question: {stem}\\nAnswer:`` → `` {text}``
arc_challenge  ``ARC-Challenge-Test.jsonl``     same
piqa           ``piqa_valid.jsonl`` + labels    ``Question: {goal}\\nAnswer:`` → `` {sol1}``, `` {sol2}``
boolq          ``boolq_dev.jsonl``              ``{passage}\\nQuestion: {question}?\\nAnswer:`` → `` no``/`` yes``
hellaswag      ``hellaswag_val_full.txt.bz2``   ``{activity_label}: {ctx}`` → `` {ending}`` × 4
lambada        ``lambada_test_plain_text.txt``  a passage a line: its words but the last → `` {last word}``
                                                (:mod:`~dpo_lit.evaluation.lambada`: ``acc``, ``ppl``)
``*.jsonl``    the path itself                  ``{"context", "choices", "answer"}`` used as they are
``*.txt``      the path itself                  UTF-8 text for perplexity, as it is; metrics named after
                                                the file's stem (``heldout.txt`` → ``heldout``)
=============  ===============================  =========================================================

A registered task reads its Hub split (:data:`TASKS`: ``Salesforce/wikitext``, ``allenai/ai2_arc``,
``ybisk/piqa``, ``google/boolq``, ``Rowan/hellaswag``, ``cimec/lambada``), or the file above in
the local mirror's ``eval/`` when ``$DPO_LIT_DATA`` names one (:mod:`dpo_lit.data.hub`); both
forms give the same items. A malformed row raises a :class:`~dpo_lit.data.errors.DataError`
naming the file (or Hub row), line and field.
"""

from __future__ import annotations

import bz2
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dpo_lit.data.errors import DataError, describe
from dpo_lit.data.hub import HubSource, hub_rows, mirror_file
from dpo_lit.data.io import read_records
from dpo_lit.errors import ConfigError, MissingFileError
from dpo_lit.evaluation.lambada import LambadaItem, load_lambada, split_passage
from dpo_lit.evaluation.multiple_choice import MCItem
from dpo_lit.evaluation.perplexity import load_text

PATH_SUFFIXES = (".jsonl", ".txt")  # tasks given as a file: multiple choice, perplexity

TaskKind = Literal["mc", "text", "lambada"]
Rows = Iterable[tuple[dict[str, Any], str]]  # records with their locations


def _get(record: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(where, f"field '{key}': expected {name}, got {describe(value)}")
    return value


def _item(context: str, choices: list[str], answer: int, where: str) -> MCItem:
    if not 0 <= answer < len(choices):
        raise DataError(where, f"answer {answer} is not the index of one of the {len(choices)} choices")
    return MCItem(context, choices, answer)


def load_arc(path: Path) -> list[MCItem]:
    """ARC-Easy/Challenge; ``answerKey`` is one of the choices' labels (letters, or digits)."""
    items = []
    for record, where in read_records(str(path)):
        question = _get(record, "question", dict, where)
        stem = _get(question, "stem", str, where)
        choices = _get(question, "choices", list, where)
        if not choices or not all(isinstance(c, dict) for c in choices):
            raise DataError(where, "field 'question.choices': expected a non-empty list of {label, text}")
        labels = [_get(c, "label", str, where) for c in choices]
        items.append(_arc_item(record, stem, labels, [_get(c, "text", str, where) for c in choices], where))
    return items


def _arc_item(record: dict[str, Any], stem: str, labels: list[str], texts: list[str], where: str) -> MCItem:
    """An ARC question, in the file's layout or the Hub's: ``answerKey`` names one of ``labels``."""
    key = _get(record, "answerKey", str, where)
    if key not in labels:
        raise DataError(where, f"field 'answerKey': {key!r} is none of the labels {labels}")
    return MCItem(f"Question: {stem}\nAnswer:", [f" {text}" for text in texts], labels.index(key))


def load_piqa(path: Path) -> list[MCItem]:
    """PIQA; the labels are in ``<stem>-labels.lst`` beside the file, one 0/1 a line."""
    labels_path = path.with_name(f"{path.stem}-labels.lst")
    labels = labels_path.read_text(encoding="utf-8").split()
    rows = list(read_records(str(path)))
    if len(labels) != len(rows):
        raise DataError(str(labels_path), f"{len(labels)} labels for the {len(rows)} rows of {path}")
    items = []
    for (record, where), label in zip(rows, labels):
        if label not in ("0", "1"):
            raise DataError(where, f"label {label!r} in {labels_path} is neither 0 nor 1")
        items.append(_piqa_item(record, int(label), where))
    return items


def _piqa_item(record: dict[str, Any], label: int, where: str) -> MCItem:
    """A PIQA goal and its two solutions, in the file's layout or the Hub's."""
    goal, sol1, sol2 = (_get(record, key, str, where) for key in ("goal", "sol1", "sol2"))
    return _item(f"Question: {goal}\nAnswer:", [f" {sol1}", f" {sol2}"], label, where)


def load_boolq(path: Path) -> list[MCItem]:
    """BoolQ; the answer ``true`` is the choice `` yes`` (index 1)."""
    return boolq_items(read_records(str(path)))


def boolq_items(rows: Rows) -> list[MCItem]:
    """BoolQ rows (the file's and the Hub's are alike) as items."""
    items = []
    for record, where in rows:
        passage, question = _get(record, "passage", str, where), _get(record, "question", str, where)
        answer = _get(record, "answer", bool, where)
        items.append(MCItem(f"{passage}\nQuestion: {question}?\nAnswer:", [" no", " yes"], int(answer)))
    return items


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: WikiHow ``[title]`` marks become sentence ends, other brackets go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_context(line: str) -> str:
    """The query from the file's ``label: ctx_a ctx_b`` line.

    lm-eval builds ``preprocess(label + ": " + ctx_a + " " + ctx_b.capitalize())``; the file
    already holds the cleaned, joined text but with ``ctx_b`` as written, lower case. For
    ActivityNet items ``ctx_b`` is the fragment after the last sentence end, so a fragment there
    that starts in lower case is capitalised (the file cannot tell ``ctx_b`` apart exactly).
    """
    head, sep, tail = line.rpartition(". ")
    if sep and tail[:1].islower():
        line = head + sep + tail.capitalize()
    return hellaswag_preprocess(line)


def load_hellaswag(path: Path) -> list[MCItem]:
    """HellaSwag in the 6-lines-a-task text layout: context, gold index, 4 endings (optionally .bz2)."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{path}:{len(lines)}", f"{len(lines)} lines is not a whole number of 6-line tasks")
    items = []
    for start in range(0, len(lines), 6):
        context, gold, *endings = lines[start : start + 6]
        if gold.strip() not in ("0", "1", "2", "3"):
            raise DataError(f"{path}:{start + 2}", f"gold index {gold!r} is not 0, 1, 2 or 3")
        choices = [f" {hellaswag_preprocess(e)}" for e in endings]
        items.append(MCItem(hellaswag_context(context), choices, int(gold)))
    return items


def arc_from_hub(rows: Rows) -> list[MCItem]:
    """ARC as the Hub has it: ``question`` a string, ``choices`` ``{"text": [...], "label": [...]}``."""
    items = []
    for record, where in rows:
        stem, choices = _get(record, "question", str, where), _get(record, "choices", dict, where)
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or not texts:
            raise DataError(where, "field 'choices': expected {text: [...], label: [...]} of one non-zero length")
        items.append(_arc_item(record, stem, labels, texts, where))
    return items


def piqa_from_hub(rows: Rows) -> list[MCItem]:
    """PIQA as the Hub has it: the label (0/1) is the row's ``label``."""
    return [_piqa_item(record, _get(record, "label", int, where), where) for record, where in rows]


def hellaswag_from_hub(rows: Rows) -> list[MCItem]:
    """HellaSwag as the Hub has it, prompted as lm-eval does:
    ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` → the endings."""
    items = []
    for record, where in rows:
        label, ctx_a, ctx_b = (_get(record, key, str, where) for key in ("activity_label", "ctx_a", "ctx_b"))
        endings = _get(record, "endings", list, where)
        gold = _get(record, "label", (str, int), where)
        if str(gold) not in ("0", "1", "2", "3") or len(endings) != 4:
            raise DataError(where, f"expected 4 endings and a label 0-3, got {len(endings)} and {gold!r}")
        context = hellaswag_preprocess(f"{label}: {ctx_a} {ctx_b.capitalize()}")
        items.append(MCItem(context, [f" {hellaswag_preprocess(e)}" for e in endings], int(gold)))
    return items


def text_from_hub(rows: Rows) -> str:
    """A text data set's lines (the Hub's WikiText rows are lines ending in a newline), blank ones
    dropped, as the mirror's file holds them."""
    return "".join(r["text"] for r, _ in rows if isinstance(r.get("text"), str) and r["text"].strip())


def lambada_from_hub(rows: Rows) -> list[LambadaItem]:
    """LAMBADA passages, one a row's ``text``."""
    return [split_passage(_get(r, "text", str, where).strip(), where) for r, where in rows]


def load_jsonl(path: Path) -> list[MCItem]:
    """Generic ``{"context": str, "choices": [str, ...], "answer": int}`` rows, used verbatim.

    Choices are continuations of the context: give them their leading space (``" Paris"``).
    """
    items = []
    for record, where in read_records(str(path)):
        context = _get(record, "context", str, where)
        choices = _get(record, "choices", list, where)
        if not choices or not all(isinstance(c, str) for c in choices):
            raise DataError(
                where, f"field 'choices': expected a non-empty list of strings, got {describe(choices)}"
            )
        items.append(_item(context, choices, _get(record, "answer", int, where), where))
    return items


def wikitext_detokenize(text: str) -> str:
    """lm-eval's ``wikitext_detokenizer``: undo WikiText's tokenisation (`` @-@ `` → ``-``, ...)."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for old, new in [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")]:
        text = text.replace(old, new)
    for mark in ":;.!?,":
        text = text.replace(f" {mark} ", f"{mark} ")
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for old, new in [
        ("= = = =", "===="),
        ("= = =", "==="),
        ("= =", "=="),
        (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    ]:
        text = text.replace(old, new)
    for old, new in [(" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")]:
        text = text.replace(old, new)
    return text


@dataclass(frozen=True)
class Task:
    """A registered evaluation: its Hub split and how to read it.

    Args:
        hub: the Hub split; a local mirror's copy (:data:`~dpo_lit.data.hub.MIRROR`) is read instead
            when ``$DPO_LIT_DATA`` names one.
        kind: ``mc`` (multiple choice, a list of :class:`MCItem`), ``text`` (perplexity of a
            text) or ``lambada`` (last-word prediction, a list of :class:`LambadaItem`).
        load: reads a file in the original release's format (the mirror's, or one passed as a path).
        from_hub: reads the Hub's rows (record, location).
    """

    hub: HubSource
    kind: TaskKind
    load: Callable[[Path], Any]
    from_hub: Callable[[Rows], Any]


TASKS: dict[str, Task] = {
    "wikitext": Task(HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", split="test"), "text",
                     lambda path: wikitext_detokenize(load_text(path)),
                     lambda rows: wikitext_detokenize(text_from_hub(rows))),
    "arc_easy": Task(HubSource("allenai/ai2_arc", "ARC-Easy", split="test"), "mc", load_arc, arc_from_hub),
    "arc_challenge": Task(HubSource("allenai/ai2_arc", "ARC-Challenge", split="test"), "mc", load_arc, arc_from_hub),
    "piqa": Task(HubSource("ybisk/piqa", split="validation"), "mc", load_piqa, piqa_from_hub),
    "boolq": Task(HubSource("google/boolq", split="validation"), "mc", load_boolq, boolq_items),
    "hellaswag": Task(HubSource("Rowan/hellaswag", split="validation"), "mc", load_hellaswag, hellaswag_from_hub),
    "lambada": Task(HubSource("cimec/lambada", split="test"), "lambada", load_lambada, lambada_from_hub),
}  # fmt: skip


def task_kind(name: str) -> TaskKind:
    """A registered task's kind; ``text`` for a ``.txt`` file, ``mc`` for a ``.jsonl`` file."""
    if name in TASKS:
        return TASKS[name].kind
    return "text" if name.endswith(".txt") else "mc"


def task_name(name: str) -> str:
    """The metric name of a task: its registry name, or a ``.jsonl``/``.txt`` file's stem."""
    return name if name in TASKS else Path(name).stem


def task_source(name: str, path: str | Path | None = None) -> Path | HubSource:
    """What a task reads: ``path`` if given, else a registered task's mirror file or Hub split (a
    task given as a file is its own path)."""
    if name not in TASKS and not name.endswith(PATH_SUFFIXES):
        raise ConfigError(
            f"unknown evaluation task {name!r}: expected one of {sorted(TASKS)}, a .jsonl or a .txt file"
        )
    if path is None and name in TASKS:
        return mirror_file(TASKS[name].hub) or TASKS[name].hub
    resolved = Path(path if path is not None else name).expanduser()
    if not resolved.is_file():
        raise MissingFileError(
            f"evaluation data for task {name!r} not found: {resolved} (relative paths start at {Path.cwd()})"
        )
    return resolved


def _read(name: str, path: str | Path | None) -> Any:
    source = task_source(name, path)
    if isinstance(source, HubSource):
        return TASKS[name].from_hub((r, f"{source}[{i}]") for i, r in enumerate(hub_rows(source)))
    if name in TASKS:
        return TASKS[name].load(source)
    return load_jsonl(source) if task_kind(name) == "mc" else load_text(source)


def load_task(
    name: str, path: str | Path | None = None, limit: int | None = None, seed: int = 0
) -> list[MCItem] | list[LambadaItem]:
    """The items of a multiple-choice or LAMBADA task; ``limit`` keeps a seeded random subset, in
    file order."""
    if task_kind(name) == "text":
        raise ValueError(f"task {name!r} is a perplexity task: use load_text_task")
    items = _read(name, path)
    if limit is not None and limit < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in keep]
    return items


def load_text_task(name: str, path: str | Path | None = None) -> str:
    """The text of a perplexity task: ``wikitext`` prepared as lm-eval prepares it, a ``.txt`` file
    as it is (read as UTF-8)."""
    if task_kind(name) != "text":
        raise ValueError(f"task {name!r} is not a perplexity task: use load_task")
    return _read(name, path)
