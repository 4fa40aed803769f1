"""dpo-lit sweep on the tiny config: a grid of runs, resumable, with commands.txt and a summary."""

import csv
import time
from pathlib import Path

import pytest

from dpo_lit.cli import run
from dpo_lit.errors import ConfigError
from dpo_lit.pipelines.sweep import Point, grid_points, parse_grid

ROOT = Path(__file__).resolve().parents[1]


def test_grid_values_are_read_as_yaml_and_multiplied_by_seeds():
    grid = parse_grid(["model.loss.init_args.beta=0.05,0.5", "model.loss=DPOLoss,IPOLoss"])
    assert grid == {"model.loss.init_args.beta": [0.05, 0.5], "model.loss": ["DPOLoss", "IPOLoss"]}
    points = grid_points(grid, seeds=[0, 1])
    assert len(points) == 8 and points[0] == Point({"model.loss.init_args.beta": 0.05, "model.loss": "DPOLoss"}, 0)
    assert points[0].name == "beta=0.05,loss=DPOLoss,seed=0"
    with pytest.raises(ConfigError, match="--grid"):
        parse_grid(["model.loss.init_args.beta"])


def test_tiny_beta_sweep_writes_a_summary_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "sweep"
    args = ["sweep", "--config", "configs/dpo/tiny.yaml", "--grid", "model.loss.init_args.beta=0.05,0.1,0.5",
            "--out_dir", str(out)]  # fmt: skip
    start = time.time()
    run([*args, "--seeds", "0"])
    first = time.time() - start
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [float(r["model.loss.init_args.beta"]) for r in rows] == [0.05, 0.1, 0.5]
    assert all(float(r["val/rewards/accuracies/final"]) >= 0.5 and float(r["seconds"]) > 0 for r in rows)
    assert {"val/loss/final", "val/loss/best", "seed"} <= set(rows[0])
    # DPO's implicit reward margins scale with beta
    margins = [float(r["val/rewards/margins/final"]) for r in rows]
    assert margins[0] < margins[2]
    commands = (out / "commands.txt").read_text().splitlines()
    assert len(commands) == 3 and commands[0].startswith("dpo-lit fit --config configs/dpo/tiny.yaml")
    assert "--model.loss.init_args.beta=0.05" in commands[0]
    assert (out / "summary.png").stat().st_size > 10_000
    # the same command again trains nothing
    start = time.time()
    run(args)
    assert time.time() - start < first / 3
    assert len(list((out / "beta=0.05,seed=0" / "lightning_logs").glob("version_*"))) == 1
    assert list(csv.DictReader((out / "summary.csv").open())) == rows
