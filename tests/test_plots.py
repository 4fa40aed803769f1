"""Plots from TensorBoard event files written here (no training): reading, group selection, CLI."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from conftest import ROOT
from torch.utils.tensorboard import SummaryWriter

from dpo_lit.cli import main, run
from dpo_lit.pipelines.plots import find_event_dir, plot_run, read_scalars


def write_run(folder: Path, scalars: dict[str, list[tuple[int, float]]]) -> Path:
    writer = SummaryWriter(str(folder))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    return folder


def full_run(folder: Path) -> Path:
    """Every group: 60 noisy train steps (drawn with a moving average), validations every 10."""
    steps, vals = range(60), range(9, 60, 10)
    return write_run(folder, {
        "train/loss": [(s, math.log(2) * math.exp(-s / 20) + 0.02 * math.sin(s)) for s in steps],
        "val/loss": [(s, math.log(2) * math.exp(-s / 25)) for s in vals],
        "train/rewards/margins": [(s, s / 10 + 0.3 * math.sin(s)) for s in steps],
        "val/rewards/margins": [(s, s / 12) for s in vals],
        "val/rewards/chosen": [(s, s / 20) for s in vals],
        "val/rewards/rejected": [(s, -s / 30) for s in vals],
        "train/rewards/accuracies": [(s, min(1.0, 0.5 + s / 80)) for s in steps],
        "val/rewards/accuracies": [(s, min(1.0, 0.5 + s / 90)) for s in vals],
        "val/kl": [(s, s / 15) for s in vals],
        "val/kl_stderr": [(s, 0.1 + s / 200) for s in vals],
        "train/kl": [(s, s / 15 + 0.05) for s in range(4, 60, 5)],
        "cap/wikitext/ppl_delta": [(s, s / 10) for s in vals],
        "cap/wikitext/ppl_ref": [(9, 20.0)],
        "cap/arc_easy/acc_delta": [(s, -s / 1000) for s in vals],
        "cap/arc_easy/acc_ref": [(9, 0.6)],
    })  # fmt: skip


def test_read_scalars_sorts_by_step_and_keeps_the_last_value(tmp_path):
    write_run(tmp_path, {"val/kl": [(5, 1.0), (1, 0.5), (5, 2.0)]})
    assert read_scalars(tmp_path) == {"val/kl": [(1, 0.5), (5, 2.0)]}


def test_every_group_is_plotted(tmp_path):
    full_run(tmp_path / "run")
    written = plot_run(tmp_path / "run")
    assert [p.name for p in written] == [
        "loss.png", "margins.png", "accuracy.png", "kl.png", "capability.png", "overview.png",
    ]  # fmt: skip
    assert all(p.parent == tmp_path / "run" / "plots" and p.stat().st_size > 10_000 for p in written)


def test_groups_without_data_are_skipped(tmp_path):
    write_run(tmp_path, {"val/loss": [(1, 0.7), (2, 0.6)], "val/kl": [(2, 0.3)], "val/kl_stderr": [(2, math.nan)]})
    written = plot_run(tmp_path, tmp_path / "out")
    assert [p.name for p in written] == ["loss.png", "kl.png", "overview.png"]


def test_the_latest_run_below_a_folder_is_read(tmp_path):
    write_run(tmp_path / "version_0", {"val/loss": [(1, 1.0)]})
    newer = write_run(tmp_path / "version_1", {"val/loss": [(1, 2.0)]})
    old_events = next((tmp_path / "version_0").iterdir())
    os.utime(old_events, (1, 1))  # the older run, whatever the file system's time resolution
    assert find_event_dir(tmp_path) == newer
    assert read_scalars(tmp_path)["val/loss"] == [(1, 2.0)]


def test_command_line_prints_the_files(tmp_path, capsys):
    full_run(tmp_path)
    run(["plots", str(tmp_path), "--out", str(tmp_path / "png")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"run: {tmp_path}"
    assert len(lines[1:]) == 6 and all(Path(p).is_file() for p in lines[1:])


def test_a_validate_run_after_fit_does_not_hide_the_fit_run(tmp_path):
    """fit, then validate (its own version folder with only val/ points): plots draw the fit run."""
    fitted = write_run(tmp_path / "version_0", {"train/loss": [(1, 0.7), (2, 0.6)], "val/loss": [(2, 0.65)]})
    os.utime(next(fitted.iterdir()), (1, 1))
    validated = write_run(tmp_path / "version_1", {"val/loss": [(0, 0.65)]})
    assert find_event_dir(tmp_path) == fitted
    assert find_event_dir(validated) == validated


def test_command_line_without_events_ends_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["dpo-lit", "plots", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"dpo-lit: error: no TensorBoard event files or metrics.csv under {tmp_path}"


def test_a_bad_option_of_plots_or_sweep_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """plots and sweep parse with jsonargparse as fit does: the same one line for a wrong option."""
    for argv, said in (
        (["plots", str(tmp_path), "--outt", "x"], "unrecognized arguments: --outt x"),
        (["sweep", "--config", "c.yaml", "--grid", "a=1", "--out_dir", str(tmp_path), "--command", "predict"],
         "command: Expected a typing.Literal['fit', 'onpolicy']. Got value: predict"),
        (["sweep", "--config", "c.yaml", "--out_dir", str(tmp_path)], "the following arguments are required: grid"),
    ):
        monkeypatch.setattr("sys.argv", ["dpo-lit", *argv])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dpo-lit: error: ") and said in err and "\n" not in err, err


def test_a_csvlogger_run_is_plotted_like_a_tensorboard_one(tmp_path, monkeypatch, capsys):
    """fit with Lightning's CSVLogger, then dpo-lit plots on its folder: the same scalars by step."""
    monkeypatch.chdir(ROOT)
    run(["fit", "--config", "configs/dpo/tiny.yaml", "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
         "--trainer.max_steps=4", "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=4",
         "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    folder = tmp_path / "lightning_logs" / "version_0"
    assert (folder / "metrics.csv").is_file() and not list(folder.glob("events.out.tfevents.*"))
    scalars = read_scalars(tmp_path)
    assert [step for step, _ in scalars["train/loss"]] == [0, 1, 2, 3] and [s for s, _ in scalars["val/loss"]] == [3]
    capsys.readouterr()
    run(["plots", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"run: {folder}" in out and (folder / "plots" / "loss.png").stat().st_size > 5_000
