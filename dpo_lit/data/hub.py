"""Hugging Face Hub data sets, read from a local mirror when one is set.

A data source ``hub:NAME`` names a Hub data set; its configuration, ``data_dir`` and split follow
as a query (the split defaults to ``train``)::

    hub:Anthropic/hh-rlhf?data_dir=helpful-base&split=test
    hub:Salesforce/wikitext?config=wikitext-2-raw-v1&split=test

Configs name their data this way, so the same config runs for a user with network (the rows come
from the Hub through ``datasets.load_dataset`` and its cache) and on a machine without it: there
``$DPO_LIT_DATA`` names a local mirror, a folder laid out like the project's shared data folder
(``preference/``, ``sentiment/``, ``eval/``; :data:`MIRROR` says which file holds which split), and
a split the mirror holds is read from there instead. A relative ``$DPO_LIT_DATA`` starts at the
current directory. A split that is neither in the mirror nor reachable on the Hub ends in one
:class:`~dpo_lit.data.errors.DataError` line naming it and both ways to get it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dpo_lit.data.errors import DataError

HUB_PREFIX = "hub:"
MIRROR_ENV = "DPO_LIT_DATA"


@dataclass(frozen=True)
class HubSource:
    """One split of a Hub data set: ``load_dataset(name, config, data_dir=data_dir, split=split)``."""

    name: str
    config: str | None = None
    data_dir: str | None = None
    split: str = "train"

    @classmethod
    def parse(cls, source: str) -> HubSource:
        """``hub:NAME[?config=C&data_dir=D&split=S]`` (the ``hub:`` prefix is optional)."""
        name, _, query = source.removeprefix(HUB_PREFIX).partition("?")
        options: dict[str, str] = {}
        keys = [f.name for f in fields(cls) if f.name != "name"]
        for part in filter(None, query.split("&")):
            key, sep, value = part.partition("=")
            if not sep or key not in keys or not value or key in options:
                raise DataError(
                    source, f"bad Hub source option {part!r}: expected hub:NAME?{'&'.join(f'{k}=...' for k in keys)}"
                )
            options[key] = value
        if not name.strip():
            raise DataError(source, "no data set name after 'hub:'")
        return cls(name.strip(), **options)

    def __str__(self) -> str:
        query = "&".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self)[1:] if getattr(self, f.name))
        return f"{HUB_PREFIX}{self.name}?{query}"

    def load_call(self) -> str:
        """The ``datasets`` call that downloads this split, as a user would type it."""
        args = [repr(self.name)] + ([repr(self.config)] if self.config else [])
        args += [f"data_dir={self.data_dir!r}"] if self.data_dir else []
        return f"datasets.load_dataset({', '.join(args)}, split={self.split!r})"


def _hub(name: str, split: str, config: str | None = None, data_dir: str | None = None) -> HubSource:
    return HubSource(name, config, data_dir, split)


MIRROR: dict[HubSource, str] = {
    **{
        _hub("Anthropic/hh-rlhf", "test", data_dir=d): f"preference/hh_rlhf_test/{d}-test.jsonl.gz"
        for d in ("harmless-base", "helpful-base", "helpful-rejection-sampled", "helpful-online")
    },
    # A sample (1000 / 200 rows) of the Hub's train/test splits, with strings where the Hub has messages.
    _hub("trl-lib/ultrafeedback_binarized", "train"): "preference/ultrafeedback_sample/train_1000.jsonl.gz",
    _hub("trl-lib/ultrafeedback_binarized", "test"): "preference/ultrafeedback_sample/eval_200.jsonl.gz",
    _hub("stanfordnlp/imdb", "train"): "sentiment/imdb_train.jsonl.gz",
    _hub("stanfordnlp/imdb", "test"): "sentiment/imdb_test.jsonl.gz",
    # The evaluation sets in their original release formats (each task reads both forms).
    _hub("Salesforce/wikitext", "test", config="wikitext-2-raw-v1"): "eval/wiki.test.raw",
    _hub("allenai/ai2_arc", "test", config="ARC-Easy"): "eval/ARC-Easy-Test.jsonl",
    _hub("allenai/ai2_arc", "test", config="ARC-Challenge"): "eval/ARC-Challenge-Test.jsonl",
    _hub("ybisk/piqa", "validation"): "eval/piqa_valid.jsonl",
    _hub("google/boolq", "validation"): "eval/boolq_dev.jsonl",
    _hub("Rowan/hellaswag", "validation"): "eval/hellaswag_val_full.txt.bz2",
    _hub("cimec/lambada", "test"): "eval/lambada_test_plain_text.txt",
}
"""Where a local mirror holds a Hub split, relative to ``$DPO_LIT_DATA``."""


def mirror_root() -> Path | None:
    """``$DPO_LIT_DATA`` as a path, or None when it is unset or empty."""
    root = os.environ.get(MIRROR_ENV, "").strip()
    return Path(root).expanduser() if root else None


def mirror_file(source: HubSource) -> Path | None:
    """The mirror's copy of ``source``, or None when no mirror is set or it holds no copy.

    Raises:
        DataError: the mirror is set and should hold ``source`` but its file is missing (a mistyped
            ``$DPO_LIT_DATA`` is named rather than silently going to the network).
    """
    root = mirror_root()
    if root is None or source not in MIRROR:
        return None
    path = root / MIRROR[source]
    if not path.is_file():
        where = f"{root} (from {Path.cwd()})" if not root.is_absolute() else str(root)
        raise DataError(str(source), f"{MIRROR_ENV}={where} has no {MIRROR[source]}; point it at a folder laid out like the project's shared data, or unset it to download from the Hub")
    return path


@contextlib.contextmanager
def _quiet_retries() -> Iterator[None]:
    """Hold back huggingface_hub's per-retry warnings: the failure, if any, is reported once."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def hub_rows(source: HubSource) -> Iterator[dict[str, Any]]:
    """The rows of ``source`` from the Hub (or ``datasets``' cache, or a local dataset folder).

    Raises:
        DataError: one line naming the data set, why it could not be loaded and how to get it.
    """
    import datasets

    kwargs = {"data_dir": source.data_dir} if source.data_dir else {}
    try:
        with _quiet_retries():
            dataset = datasets.load_dataset(source.name, source.config, split=source.split, **kwargs)
    except Exception as e:  # noqa: BLE001 -- network, offline mode, missing split: all said in one line
        raise DataError(str(source), unreachable(source, e)) from None
    for record in dataset:
        yield dict(record)


def unreachable(source: HubSource, error: BaseException) -> str:
    """Why ``source`` could not be loaded, and both ways to get it."""
    reason = " ".join(str(error).split()) or type(error).__name__
    root = mirror_root()
    mirror = (
        f" ({MIRROR_ENV}={root} holds no copy of this split)"
        if root is not None
        else f" or set {MIRROR_ENV} to a local mirror (a folder laid out like the project's shared data)"
    )
    return (
        f"could not load {source.name} from the Hugging Face Hub ({type(error).__name__}: {reason[:200]}); "
        f"with network it is downloaded by {source.load_call()}; offline, name a local copy in the config"
        f"{mirror}"
    )
