"""Shared fixtures: the two offline tokenizers and the real data folder beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
if SHARED_DATA.is_dir():  # the local mirror of the Hub data sets, as the Makefile sets it
    os.environ.setdefault("DPO_LIT_DATA", str(SHARED_DATA))


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """The byte-level test tokenizer: adds ``<s>`` itself and its chat template writes it too."""
    from dpo_lit.models import load_tokenizer

    return load_tokenizer("tiny-random-llama")


@pytest.fixture(scope="session")
def smol_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's tokenizer (ChatML template, no BOS added, pad = eos)."""
    from dpo_lit.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` from the project's root; tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder not found: {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def eval_mirror(monkeypatch: pytest.MonkeyPatch):
    """``use(folder)`` points the local mirror (``$DPO_LIT_DATA``) at a root whose ``eval/`` is
    ``folder``, so registered evaluation tasks read their files from there."""

    def use(folder: Path) -> Path:
        folder = Path(folder)
        if folder.name == "eval":
            root = folder.parent
        else:
            root = folder.parent / f"{folder.name}-mirror"
            root.mkdir(exist_ok=True)
            if not (root / "eval").exists():
                (root / "eval").symlink_to(folder, target_is_directory=True)
        monkeypatch.setenv("DPO_LIT_DATA", str(root))
        return root

    return use
