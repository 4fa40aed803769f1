"""Shared fixtures: the two offline tokenizers and the real data folder beside the project."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


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
