"""The command line's Trainer: precision auto by the hardware (bf16 where it is fast, float32 elsewhere)."""


import pytest
from conftest import ROOT

from dpo_lit.cli import run as main
from dpo_lit.trainer import auto_precision, cpu_bf16_flags


@pytest.mark.parametrize(
    ("accelerator", "cuda_bf16", "cpu_flags", "expected"),
    [
        ("cpu", None, ["amx_bf16", "avx512_bf16"], "bf16-mixed"),  # Sapphire Rapids and later Xeons
        ("cpu", None, ["avx512_bf16"], "bf16-mixed"),  # Cooper Lake, Zen 4
        ("cpu", None, [], "32-true"),  # AVX2 only: bf16 emulated, 4.5x slower
        ("gpu", True, None, "bf16-mixed"),  # Ampere and later
        ("cuda", False, None, "32-true"),  # V100, T4: no bf16
        ("mps", None, None, "32-true"),
    ],
)
def test_auto_precision_follows_the_hardware(accelerator, cuda_bf16, cpu_flags, expected):
    precision, why = auto_precision(accelerator, cuda_bf16=cuda_bf16, cpu_flags=cpu_flags)
    assert precision == expected and why


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\n")
    assert cpu_bf16_flags(cpuinfo) == ["amx_bf16", "avx512_bf16"]
    cpuinfo.write_text("flags\t\t: fpu sse avx2\n")
    assert cpu_bf16_flags(cpuinfo) == []
    assert cpu_bf16_flags(tmp_path / "missing") == []


def test_fit_with_auto_precision_says_what_it_chose_and_trains_in_it(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    expected, _ = auto_precision("cpu")
    said: list[str] = []
    # what the Trainer says, taken where it says it: Lightning's log handlers and levels are changed
    # process-wide by the in-process pipeline tests
    monkeypatch.setattr("dpo_lit.trainer.rank_zero_info", said.append)
    cli = main([
        "fit", "--config", "configs/dpo/tiny.yaml", "--trainer.precision=auto", "--trainer.accelerator=cpu",
        "--trainer.max_steps=2", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ])
    assert cli.trainer.precision == expected
    assert cli.trainer.global_step == 2
    said = [message for message in said if "trainer.precision=auto" in message]
    assert len(said) == 1 and said[0].startswith(f"trainer.precision=auto: {expected} on ")


def test_an_accelerator_given_as_an_instance_is_named_by_its_type():
    from lightning.pytorch.accelerators import CPUAccelerator

    from dpo_lit.trainer import _accelerator_name

    assert _accelerator_name(CPUAccelerator()) == "cpu" and _accelerator_name("gpu") == "gpu"


def test_the_progress_bar_shows_what_the_run_measured_not_the_log_version(tmp_path, monkeypatch):
    from dpo_lit.trainer import RunProgressBar

    monkeypatch.chdir(ROOT)
    common = ["fit", "--config", "configs/dpo/tiny.yaml", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
              f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    cli = main(common)
    bar = cli.trainer.progress_bar_callback
    metrics = bar.get_metrics(cli.trainer, cli.model)
    assert isinstance(bar, RunProgressBar) and "v_num" not in metrics and "train/loss" in metrics
    assert main([*common, "--trainer.enable_progress_bar=false"]).trainer.progress_bar_callback is None
