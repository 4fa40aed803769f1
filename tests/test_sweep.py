"""dpo-lit sweep on the tiny config: a grid of runs, resumable, with commands.txt and a summary."""

import csv
import time

import pytest
from conftest import ROOT
from torch.utils.tensorboard import SummaryWriter

from dpo_lit.cli import run
from dpo_lit.errors import ConfigError
from dpo_lit.pipelines.sweep import Point, fit_metrics, grid_points, parse_grid


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


def test_tiny_onpolicy_beta_sweep_shares_the_starting_models_work(tmp_path, monkeypatch, capfd, shared_data):
    """Every point trains on the same pairs and is compared with the same reference samples and
    capability scores, computed by the first point only; beta reaches each point's training."""
    import json

    import yaml

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("DPO_LIT_CACHE", str(tmp_path / "cache"))
    extra = tmp_path / "extra.yaml"
    extra.write_text("{rounds: 1, capability_tasks: [wikitext, arc_easy], capability_limit: 8, perplexity_tokens: 128}")
    out = tmp_path / "sweep"
    run(["sweep", "--command", "onpolicy", "--config", "configs/quickstart/tiny_pipeline.yaml", "--config", str(extra),
         "--grid", "beta=0.05,0.5", "--out_dir", str(out)])  # fmt: skip
    console = capfd.readouterr().out
    assert console.count("copied from the cache: an earlier run made these pairs") == 1
    first, second = out / "beta=0.05,seed=0", out / "beta=0.5,seed=0"
    assert (first / "round1/pairs.jsonl").read_bytes() == (second / "round1/pairs.jsonl").read_bytes()
    for folder, beta in ((first, 0.05), (second, 0.5)):
        config = yaml.safe_load((folder / "round1/lightning_logs/version_0/config.yaml").read_text())
        assert config["model"]["init_args"]["loss"]["init_args"]["beta"] == beta
    reports = [json.loads((folder / "report.json").read_text())[0] for folder in (first, second)]
    assert reports[0]["reference_reward"] == reports[1]["reference_reward"]
    assert reports[0]["kl"] != reports[1]["kl"]  # different policies
    for report in reports:
        caps = report["capabilities"]
        assert {"wikitext/ppl", "arc_easy/acc", "arc_easy/acc_norm"} <= set(caps)
        for values in caps.values():
            assert values["delta"] == pytest.approx(values["policy"] - values["reference"])
    assert reports[0]["capabilities"]["wikitext/ppl"]["reference"] == reports[1]["capabilities"]["wikitext/ppl"]["reference"]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [float(r["beta"]) for r in rows] == [0.05, 0.5]
    assert float(rows[1]["cap/wikitext/ppl_delta"]) == pytest.approx(reports[1]["capabilities"]["wikitext/ppl"]["delta"])
    assert {"policy_reward", "paired_gain", "kl"} <= set(rows[0])


def test_sweep_best_is_the_lowest_bits_per_byte_and_nll_and_absent_without_a_direction(tmp_path):
    """The summary's best of each metric goes the metric's way: the lowest bits per byte, NLL and
    loss, the highest accuracy; a metric with no better direction (one side's reward) has none."""
    writer = SummaryWriter(str(tmp_path / "lightning_logs" / "version_0"))
    curves = {"cap/wikitext/bits_per_byte": [1.2, 0.9, 1.0], "cap/lambada/nll": [3.0, 2.5, 2.8],
              "val/loss": [0.7, 0.4, 0.5], "cap/arc_easy/acc": [0.5, 0.7, 0.6], "val/rewards/chosen": [0.1, 0.4, 0.2]}  # fmt: skip
    for tag, values in curves.items():
        for step, value in enumerate(values):
            writer.add_scalar(tag, value, step)
    writer.close()
    metrics = fit_metrics(tmp_path)
    for tag, best in (("cap/wikitext/bits_per_byte", 0.9), ("cap/lambada/nll", 2.5), ("val/loss", 0.4),
                      ("cap/arc_easy/acc", 0.7)):  # fmt: skip
        assert metrics[f"{tag}/best"] == pytest.approx(best), tag
        assert metrics[f"{tag}/final"] == pytest.approx(curves[tag][-1]), tag
    assert "val/rewards/chosen/best" not in metrics
    assert metrics["val/rewards/chosen/final"] == pytest.approx(0.2)


def test_sweep_best_capability_delta_goes_its_metrics_way(tmp_path):
    """CapabilityEval logs ``cap/<task>/<metric>_delta`` (policy − reference) and ``_ref``: the best
    bits-per-byte and perplexity delta is the lowest, the best accuracy delta the highest; the
    reference's own score has no best."""
    writer = SummaryWriter(str(tmp_path / "lightning_logs" / "version_0"))
    curves = {"cap/wikitext/bits_per_byte_delta": [0.05, -0.02, 0.01], "cap/wikitext/ppl_delta": [0.3, 0.9],
              "cap/arc_easy/acc_delta": [-0.1, 0.05, 0.0], "cap/wikitext/bits_per_byte_ref": [1.1]}  # fmt: skip
    for tag, values in curves.items():
        for step, value in enumerate(values):
            writer.add_scalar(tag, value, step)
    writer.close()
    metrics = fit_metrics(tmp_path)
    bests = {"cap/wikitext/bits_per_byte_delta": -0.02, "cap/wikitext/ppl_delta": 0.3, "cap/arc_easy/acc_delta": 0.05}
    for tag, best in bests.items():
        assert metrics[f"{tag}/best"] == pytest.approx(best), tag
    assert "cap/wikitext/bits_per_byte_ref/best" not in metrics
    assert metrics["cap/wikitext/bits_per_byte_ref/final"] == pytest.approx(1.1)


def test_fixed_overrides_go_to_every_point_but_not_into_folder_names_and_a_failed_point_names_the_sweep(
    tmp_path, monkeypatch
):
    import torch

    monkeypatch.chdir(ROOT)
    out = tmp_path / "sweep"
    base = ["sweep", "--config", "configs/dpo/tiny.yaml", "--out_dir", str(out)]
    run([*base, "--grid", "model.loss.init_args.beta=0.1,0.5", "--set", "trainer.max_steps=2",
         "--set", "trainer.limit_val_batches=1"])  # fmt: skip
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["beta=0.1,seed=0", "beta=0.5,seed=0"]
    commands = (out / "commands.txt").read_text().splitlines()
    assert all("--trainer.max_steps=2" in c and "--trainer.limit_val_batches=1" in c for c in commands)
    last = out / "beta=0.1,seed=0" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    with pytest.raises(ConfigError, match="--set: model.loss.init_args.beta is also in --grid"):
        run([*base, "--grid", "model.loss.init_args.beta=0.1", "--set", "model.loss.init_args.beta=0.2"])
    with pytest.raises(SystemExit, match=r"^dpo-lit sweep, point beta=0.3,seed=0: `dpo-lit fit --config .*` failed \(exit 2\)"):
        run([*base, "--grid", "model.loss.init_args.beta=0.3", "--set", "data.max_length=-1"])
