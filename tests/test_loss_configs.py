"""configs/loss/: every loss has a fragment, each stacks on the tiny DPO config and trains.

Each fragment is parsed over ``configs/dpo/tiny.yaml`` with the project's CLI parser and trained
3 steps through the real CLI (about 2 s each on 2 CPU cores).
"""

import inspect
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, configs, parse_config

import dpo_lit.losses
from dpo_lit.cli import run
from dpo_lit.losses import PreferenceLoss

FRAGMENTS = configs("fragments/loss")
BASE = "configs/dpo/tiny.yaml"


def class_path(path: Path) -> str:
    return yaml.safe_load(path.read_text())["model"]["loss"]["class_path"]


def fit_args(path: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", BASE, "--config", str(path.relative_to(ROOT)), "--trainer.max_steps=3",
        "--trainer.limit_val_batches=1", "--trainer.val_check_interval=3", "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.logger=false", "--export.enabled=false", *extra,
    ]


def test_every_loss_class_has_a_fragment():
    classes = {
        f"dpo_lit.losses.{name}" for name, obj in vars(dpo_lit.losses).items()
        if inspect.isclass(obj) and issubclass(obj, PreferenceLoss) and not inspect.isabstract(obj)
    }
    assert classes <= {class_path(p) for p in FRAGMENTS}, "loss classes without a configs/loss/ fragment"
    assert len(FRAGMENTS) >= len(classes)


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: p.stem)
def test_fragment_parses_over_the_tiny_config(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    header = path.read_text().splitlines()
    assert header[0].startswith("# ") and f"--config configs/loss/{path.name}" in "\n".join(header[:4])
    config = parse_config(["--config", BASE, "--config", str(path)])
    assert config.model.init_args.loss.class_path == class_path(path)
    assert config.model.init_args.model_name == "tiny-random-llama"  # the rest of the base config is kept
    assert config.data.init_args.mode == ("unpaired" if path.stem == "kto" else "paired")


@pytest.mark.parametrize("base", ["configs/dpo/smollm2_hh_lora.yaml", "configs/dpo/smollm2_uf_full.yaml"])
def test_every_fragment_stacks_on_the_smollm2_runs(base, monkeypatch):
    """The per-method SmolLM2 runs are a DPO base plus a loss fragment: the loss changes, nothing else."""
    monkeypatch.chdir(ROOT)
    plain = parse_config(["--config", base])
    for path in FRAGMENTS:
        config = parse_config(["--config", base, "--config", str(path)])
        assert config.model.init_args.loss.class_path == class_path(path), path.name
        model, base_model = config.model.init_args, plain.model.init_args
        assert model.lora == base_model.lora and model.optimizer == base_model.optimizer
        assert config.data.init_args.train_files == plain.data.init_args.train_files and config.trainer == plain.trainer


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: p.stem)
def test_fragment_trains_a_few_steps(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = run(fit_args(path, tmp_path))
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 3
    assert type(cli.model.loss).__module__.startswith("dpo_lit.losses")
    assert f"{type(cli.model.loss).__module__.rsplit('.', 1)[0]}.{type(cli.model.loss).__name__}" == class_path(path)
    assert math.isfinite(float(metrics["train/loss"])) and math.isfinite(float(metrics["val/loss"]))


def test_bco_running_shift_is_saved_in_the_checkpoint(tmp_path, monkeypatch):
    """Three training steps fold three batch means into δ; the checkpoint carries δ and the count."""
    monkeypatch.chdir(ROOT)
    cli = run(fit_args(ROOT / "configs" / "loss" / "bco.yaml", tmp_path, "--trainer.enable_checkpointing=true"))
    loss = cli.model.loss
    assert int(loss.steps) == 3 and float(loss.delta) != 0.0
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    torch.testing.assert_close(state["loss.delta"], loss.delta)
    assert int(state["loss.steps"]) == 3
