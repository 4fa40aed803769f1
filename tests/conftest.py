"""Shared fixtures: the two offline tokenizers and the real data folder beside the project."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import PreTrainedTokenizerBase

ROOT = Path(__file__).resolve().parents[1]
"""The project's root: the tests read configs/, experiments/ and dpo_lit/assets/ from here."""
ASSETS = ROOT / "dpo_lit" / "assets"
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
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


# ---- helpers shared by several test modules (import them: ``from conftest import ...``) ---------


def random_pair(b: int = 16, seed: int = 0):
    """Random but plausible summed log-probs and token counts of ``b`` preference pairs (float64)."""
    from dpo_lit.losses import PairLogps

    g = torch.Generator().manual_seed(seed)
    logps = [-torch.rand(b, generator=g, dtype=torch.float64) * 40 - 0.1 for _ in range(4)]
    tokens = [torch.randint(1, 30, (b,), generator=g) for _ in range(2)]
    return PairLogps(*logps, *tokens)


LOGP_FIELDS = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "chosen_tokens", "rejected_tokens")


def per_element(fn, logps) -> torch.Tensor:
    """Apply ``fn(pc, pr, rc, rr, ct, rt)`` to plain floats, one example at a time."""
    rows = zip(*(getattr(logps, name).tolist() for name in LOGP_FIELDS))
    return torch.tensor([fn(*row) for row in rows], dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def make_batch(vocab: int, seed: int = 0):
    """Four rows of 16 random ids: one right-padded, one with a longer prompt; (ids, attention, completion)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 16), generator=g)
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 6:] = True
    attention[1, 11:] = 0  # a right-padded row
    completion[1, 11:] = False
    completion[3, :9] = False  # a longer prompt
    return ids, attention, completion


def tiny_data(**kwargs):
    """The tiny preference pairs (train and validation files) for the tiny model."""
    from dpo_lit.data import PreferenceDataModule
    from dpo_lit.models import TINY_ALIAS

    kwargs = {"batch_size": 4, "max_length": 256, "max_prompt_length": 128, **kwargs}
    return PreferenceDataModule(
        tokenizer_name=TINY_ALIAS,
        train_files=[str(ASSETS / "tiny_pairs.jsonl")],
        val_files=[str(ASSETS / "tiny_pairs_val.jsonl")],
        **kwargs,
    )


def fit_steps(module, data, tmp_path, steps: int = 1, **kwargs):
    """Fit ``steps`` optimizer steps on CPU without logger, checkpoints or progress bar."""
    from lightning import Trainer

    trainer = Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        limit_val_batches=kwargs.pop("limit_val_batches", 0), val_check_interval=steps, **kwargs,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return trainer


def adam(lr: float = 1e-3):
    return lambda params: torch.optim.AdamW(params, lr=lr)


# ---- configs ---------------------------------------------------------------------------------------

CONFIGS = yaml.safe_load((ROOT / "configs" / "index.yaml").read_text())  # every shipped config, by kind


def configs(kind: str) -> list[Path]:
    """The shipped configs of ``kind`` (a command, or ``fragments/loss`` etc.), as configs/index.yaml lists them."""
    group, _, part = kind.partition("/")
    return [ROOT / path for path in (CONFIGS[group][part] if part else CONFIGS[group])]


def parse_config(args: list[str]):
    """``dpo-lit fit``'s parsed and type-checked configuration for ``args``, without loading any model or data."""
    from dpo_lit.jobs import DPOLitCLI

    class ParseOnlyCLI(DPOLitCLI):
        def instantiate_classes(self) -> None:
            pass

    return ParseOnlyCLI(run=False, args=args).config


# ---- runs of the console script in a fresh process ------------------------------------------------

KILLER = '''
import os, signal
from lightning import Callback

class KillAt(Callback):
    """SIGKILL this process (no cleanup, no final checkpoint) once training reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def dpo_lit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``dpo-lit`` in a fresh process, offline, one thread per process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DPO_LIT_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dpo_lit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip


def policy_weights(root: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
                            weights_only=True)  # fmt: skip
    return {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")} | {
        "global_step": torch.tensor(checkpoint["global_step"])
    }


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
