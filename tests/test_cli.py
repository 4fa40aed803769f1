"""The CLI: every shipped YAML parses, the tiny ones train, losses swap on the command line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from conftest import parse_config as parse

from dpo_lit.cli import run as main
from dpo_lit.losses import DPOLoss, IPOLoss


def test_loss_swaps_on_the_command_line(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = parse(["--config", "configs/dpo/tiny.yaml", "--model.loss=IPOLoss", "--model.loss.beta=0.3"])
    assert config.model.init_args.loss.class_path == "dpo_lit.losses.IPOLoss"
    assert config.model.init_args.loss.init_args.beta == 0.3


def test_print_config(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/dpo/tiny.yaml", "--model.loss=IPOLoss", "--print_config"])
    out = capsys.readouterr().out
    assert "dpo_lit.losses.IPOLoss" in out and "tokenizer_name" not in out.split("data:")[1].split("\n")[0]


def test_tiny_dpo_learns_and_validate_reproduces_it(tmp_path, monkeypatch):
    """The tiny config learns its preference task; validate on its checkpoint gives the same numbers."""
    monkeypatch.chdir(ROOT)
    common = ["--config", "configs/dpo/tiny.yaml", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false"]
    fitted = main(["fit", *common])
    accuracy = float(fitted.trainer.callback_metrics["val/rewards/accuracies"])
    assert accuracy >= 0.9, f"validation reward accuracy {accuracy:.2f} < 0.9"
    assert type(fitted.model.loss) is DPOLoss and fitted.model.loss.beta == 0.1  # as configs/dpo/tiny.yaml says
    ckpt = fitted.trainer.checkpoint_callback.best_model_path
    validated = main(["validate", *common, f"--ckpt_path={ckpt}"])
    metrics = validated.trainer.callback_metrics
    assert float(metrics["val/rewards/accuracies"]) == pytest.approx(accuracy)
    assert float(metrics["val/loss"]) == pytest.approx(float(fitted.trainer.callback_metrics["val/loss"]), rel=1e-5)
    assert type(validated.model.loss) is DPOLoss and validated.model.loss.beta == fitted.model.loss.beta


def test_swapped_loss_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = main([
        "fit", "--config", "configs/dpo/tiny.yaml", "--model.loss=IPOLoss", "--model.loss.beta=0.3",
        "--trainer.max_steps=2", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ])
    assert isinstance(cli.model.loss, IPOLoss) and cli.model.loss.beta == 0.3


def test_bad_data_ends_in_one_clear_line(tmp_path, monkeypatch, capsys):
    """A user's data mistake: exit status 2 and one line naming file, line and field, no traceback."""
    from dpo_lit.cli import main as console_main

    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}\n{"prompt": "Hi", "chosen": 3, "rejected": "x"}\n')
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", [
        "dpo-lit", "fit", "--config", "configs/dpo/tiny.yaml", f"--data.train_files=[{bad}]",
        f"--trainer.default_root_dir={tmp_path}",
    ])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dpo-lit: error: ") and f"{bad}:2" in err[-1] and "'chosen'" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_validate_prints_preference_kl_and_capability_tables(tmp_path, monkeypatch, capsys):
    """`validate` without a checkpoint reports the reference itself: capability deltas are 0."""
    monkeypatch.chdir(ROOT)
    if not (ROOT / ".." / "shared" / "data" / "eval").is_dir():
        pytest.skip("../shared/data/eval not found")
    main([
        "validate", "--config", "configs/dpo/tiny.yaml", "--config", "configs/callbacks/monitoring.yaml", "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ])
    out = capsys.readouterr().out
    report = out[out.index("validation (held-out pairs"):]
    assert "val/kl" in report and "val/rewards/accuracies" in report
    table = report[report.index("capability"):].splitlines()[2:]
    assert {line.split()[0] for line in table} == {"wikitext", "arc_easy", "piqa"}
    assert all(float(line.split()[-1]) == 0.0 for line in table)


def test_console_shows_no_adverts_or_library_deprecations(tmp_path):
    """A fit from the console: no Lightning "Tip" adverts, no deprecation warnings from inside libraries,
    no warning that epochs shorter than the logging interval log nothing (they do log)."""
    done = subprocess.run(
        [sys.executable, "-m", "dpo_lit", "fit", "--config", "configs/dpo/tiny.yaml", "--trainer.max_steps=2",
         "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
         "--model.lora.r=4", "--model.gradient_checkpointing=true", "--trainer.log_every_n_steps=1000"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-2000:]
    assert "Tip:" not in console and "is deprecated" not in console and "args parameter" not in console, console
    assert "Warning" not in console and "logging interval" not in console, console


def test_no_subcommand_lists_every_subcommand(capsys):
    assert main([]) is None
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in ("fit", "validate", "predict", "onpolicy", "plots"))
    assert "  test " not in out and ",test," not in out  # no module defines a test step


def test_test_is_not_a_subcommand_and_says_what_to_run_instead(monkeypatch, capsys):
    """Lightning's test loop needs a test_step no module defines: one line pointing at validate."""
    from dpo_lit.cli import main as console_main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["dpo-lit", "test", "--config", "configs/dpo/tiny.yaml"])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpo-lit: error: dpo-lit has no test subcommand") and "validate" in err[0]


def test_reference_by_class_path_and_by_shortcut(tmp_path, monkeypatch):
    from dpo_lit.reference import CopyReference, SyncedReference

    monkeypatch.chdir(ROOT)
    common = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", "--export.enabled=false"]  # fmt: skip
    synced = main([
        "fit", "--config", "configs/dpo/tiny.yaml", "--model.reference=dpo_lit.reference.SyncedReference",
        "--model.reference.mixup_alpha=0.5", "--model.reference.sync_steps=1", *common,
    ])  # fmt: skip
    reference = synced.model.reference
    assert type(reference) is SyncedReference and reference.mixup_alpha == 0.5 and reference.last_step == 2
    copy = main(["fit", "--config", "configs/dpo/tiny.yaml", "--model.reference=copy", *common])
    assert type(copy.model.reference) is CopyReference


def test_a_config_naming_another_module_gets_that_modules_defaults(monkeypatch):
    """jsonargparse keeps the init_args a new class_path shares with the default class; the CLI
    parses again so PPOModule's own defaults (constant schedule, no warm-up) hold."""
    monkeypatch.chdir(ROOT)
    ppo = parse(["--config", "configs/ppo/tiny.yaml"]).model
    assert ppo.class_path == "dpo_lit.rlhf.PPOModule"
    assert ppo.init_args.scheduler == "constant" and ppo.init_args.warmup_ratio == 0.0
    dpo = parse(["--config", "configs/dpo/tiny.yaml"]).model.init_args
    assert dpo.scheduler == "linear" and dpo.warmup_ratio == 0.1
    overridden = parse(["--config", "configs/ppo/tiny.yaml", "--model.scheduler=cosine"]).model.init_args
    assert overridden.scheduler == "cosine" and overridden.warmup_ratio == 0.0


def _console(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``dpo-lit`` as a user runs it, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "dpo_lit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model.loss=KTOLoss"], "set --data.mode unpaired"),
        (["--model.model_name=smollm2-135m"], "not an alias (smollm2-135m-instruct, tiny-random-llama)"),
        (["--model.model_name=runs/no/such/merged"], "model folder not found: runs/no/such/merged"),
        (["--model.model_name=HuggingFaceTB/SmolLM2-360M-Instruct"], "huggingface-cli download"),
        (["--model.betaa=3"], "model: Option 'betaa' is not accepted"),
        (["--trainer.max_stepz=3"], "unrecognized arguments: --trainer.max_stepz"),
        (["--model.loss.beta=0"], "model.loss.init_args.beta: DPOLoss's beta must be > 0, got 0.0"),
        (["--model.loss=NoSuchLoss"], "model: loss: Expected a path but NoSuchLoss either not accessible"),
        (["--model.lora.target_modules=[qq_proj]"], "model.lora.target_modules: qq_proj not in LlamaForCausalLM; "
                                                    "its linear layers are down_proj, gate_proj, k_proj"),
        (["--data.max_prompt_length=256"], "data.max_prompt_length: max_prompt_length (256) must be below max_length"),
        (["--data.batch_size=0"], "data.batch_size: must be at least 1, got 0"),
        (["--trainer.max_steps=-5"], "trainer: `max_steps` must be a non-negative integer or -1"),
    ],
    ids=["kto-on-pairs", "mistyped-alias", "missing-folder", "offline-hub-name", "bad-option", "bad-trainer-option",
         "beta-0", "unknown-loss", "lora-targets-absent", "prompt-not-below-max-length", "batch-size-0",
         "bad-trainer-value"],
)
def test_a_users_mistake_ends_in_one_line(args, expected, tmp_path):
    done = _console("fit", "--config", "configs/dpo/tiny.yaml", f"--trainer.default_root_dir={tmp_path}", *args)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "usage:" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("dpo-lit: error: ")]
    assert len(errors) == 1 and expected in errors[0], done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == errors[0]


def test_config_before_the_subcommand_says_where_it_goes():
    done = _console("--config", "configs/dpo/tiny.yaml", "fit")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "dpo-lit: error: the subcommand comes first, then its options: dpo-lit fit --config configs/dpo/tiny.yaml"
    )


def test_a_short_run_leaves_last_ckpt_and_ckpt_path_last_resumes_it(tmp_path, monkeypatch):
    """2 steps of a 6-batch epoch, no validation due: fit still ends with last.ckpt (at step 2), the
    progress bar's epoch count comes from max_steps, and --ckpt_path last finds the checkpoint and
    goes on in the same log folder."""
    import torch

    from dpo_lit.errors import ConfigError

    monkeypatch.chdir(ROOT)
    common = ["--config", "configs/dpo/tiny.yaml", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", "--trainer.max_epochs=-1", "--trainer.val_check_interval=50",
              "--trainer.check_val_every_n_epoch=null"]  # fmt: skip
    first = main(["fit", *common, "--trainer.max_steps=2"])
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert [path.name for path in last.parent.glob("last*.ckpt")] == ["last.ckpt"]  # one, not last-v1 beside it
    assert first.trainer.max_epochs == 1  # not -1: the bar shows "Epoch 0/0"
    resumed = main(["fit", *common, "--trainer.max_steps=4", "--ckpt_path=last"])
    assert resumed.trainer.ckpt_path == str(last) and resumed.trainer.global_step == 4
    # the resumed run continues its own log folder: one TensorBoard run, last.ckpt where it was
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    assert torch.load(last, weights_only=False)["global_step"] == 4
    validated = main(["validate", *common, "--trainer.limit_val_batches=1", "--ckpt_path=last"])
    assert validated.trainer.ckpt_path == str(last)
    with pytest.raises(ConfigError, match="no last.ckpt under"):
        main(["validate", *common[:1], "configs/dpo/tiny.yaml", f"--trainer.default_root_dir={tmp_path / 'none'}",
              "--ckpt_path=last"])  # fmt: skip


@pytest.mark.parametrize(
    ("option", "named"),
    [("--trainer.max_step=2", "--trainer.max_step=2"), ("--optimizer=SGD", "--optimizer=SGD"),
     ("--lr_scheduler=StepLR", "--lr_scheduler=StepLR")],
    ids=["abbreviation", "optimizer", "lr_scheduler"],
)
def test_a_typo_or_lightnings_optimizer_options_end_in_one_line(option, named, tmp_path, monkeypatch, capsys):
    """--trainer.max_step is a typo, not an abbreviation of max_steps; Lightning's --optimizer and
    --lr_scheduler would replace the module's optimizer and drop its schedule while config.yaml
    still named them: the one way to set them is model.optimizer / model.scheduler."""
    from dpo_lit.cli import main as console_main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["dpo-lit", "fit", "--config", "configs/dpo/tiny.yaml", option,
                                     f"--trainer.default_root_dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dpo-lit: error: unrecognized arguments: {named} (--help lists the options)"]
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.parametrize(
    ("option", "expected"),
    [("--model.loss.beta=abc", "model: loss: beta: Expected a <class 'float'>. Got value: abc (given: loss.beta='abc')"),
     ("--model.loss=NoSuchLoss", "model: loss: Expected a path but NoSuchLoss either not accessible or invalid "
                                 "Expected a dot import path string: NoSuchLoss (given: loss='NoSuchLoss')")],
)  # fmt: skip
def test_a_bad_nested_value_is_named_without_parser_reprs(option, expected, monkeypatch, capsys):
    from dpo_lit.cli import main as console_main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["dpo-lit", "fit", "--config", "configs/dpo/tiny.yaml", option])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"dpo-lit: error: {expected} (--help lists the options)"]


@pytest.mark.parametrize("path", ["configs/sft/smollm2_imdb.yaml", "configs/reward/smollm2_hh.yaml"])
def test_a_run_shorter_than_its_validation_interval_still_runs(path, tmp_path, monkeypatch, shared_data):
    """An integer val_check_interval counts batches across epochs: a 16-example run of a config made
    for hundreds of steps trains instead of stopping in Lightning's interval check, and validates
    once, at its end (the interval is longer than the run)."""
    monkeypatch.chdir(ROOT)
    cli = main([
        "fit", "--config", path, "--model.model_name=tiny-random-llama", "--data.max_examples=16",
        "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ])
    assert cli.trainer.global_step == 2 and cli.trainer.check_val_every_n_epoch is None
    assert cli.trainer.val_check_interval == 2 * cli.trainer.accumulate_grad_batches
    assert "val/loss" in cli.trainer.callback_metrics


def test_a_resumed_run_logs_into_its_own_folder_and_plots_draw_the_whole_run(tmp_path, monkeypatch):
    """fit 2 steps, then --ckpt_path last to 4: one version folder whose TensorBoard scalars cover
    steps 1-4, which dpo-lit plots reads as one run."""
    from dpo_lit.pipelines.plots import read_scalars

    monkeypatch.chdir(ROOT)
    common = ["--config", "configs/dpo/tiny.yaml", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0"]
    main(["fit", *common, "--trainer.max_steps=2"])
    main(["fit", *common, "--trainer.max_steps=4", "--ckpt_path=last"])
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    steps = [step for step, _ in read_scalars(tmp_path / "lightning_logs" / "version_0")["train/loss"]]
    assert steps == [0, 1, 2, 3]


def test_validating_a_runs_checkpoint_logs_into_that_run_and_keeps_its_config(tmp_path, monkeypatch, capsys):
    """validate --ckpt_path last: no new version folder; the metrics go to the run's TensorBoard at
    the checkpoint's step; the training config.yaml stays, validate's own goes beside it."""
    from dpo_lit.pipelines.plots import read_scalars

    monkeypatch.chdir(ROOT)
    common = ["--config", "configs/dpo/tiny.yaml", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1"]  # fmt: skip
    main(["fit", *common, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    run = tmp_path / "lightning_logs" / "version_0"
    trained = (run / "config.yaml").read_text()
    main(["validate", *common, "--ckpt_path=last", "--data.max_length=200"])
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    assert (run / "config.yaml").read_text() == trained
    assert "max_length: 200" in (run / "validate_config.yaml").read_text() and "max_length: 200" not in trained
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # fit's, then validate's, in one folder
    [(step, _)] = read_scalars(run)["val/loss"]  # both at the checkpoint's step (0-based 1), not 0
    assert step == 1


@pytest.mark.parametrize(("logger", "package"), [("WandbLogger", "wandb"), ("MLFlowLogger", "mlflow")])
def test_a_logger_whose_package_is_missing_ends_in_one_line(logger, package, tmp_path, monkeypatch, capsys):
    """An optional logger without its package: one line naming the logger and what to install."""
    import importlib.util

    from dpo_lit.cli import main as console_main

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["dpo-lit", "fit", "--config", "configs/dpo/tiny.yaml", f"--trainer.logger={logger}",
                                     f"--trainer.default_root_dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"dpo-lit: error: {logger} needs a package that is not installed") and "pip install" in err[-1]
    assert package in err[-1] and "Traceback" not in "\n".join(err)


def test_mlflow_records_the_run_when_installed(tmp_path, monkeypatch):
    """pip install -e '.[mlflow]': --trainer.logger=MLFlowLogger logs the same metrics as TensorBoard."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database, or this, for a folder
    uri = f"file:{tmp_path / 'mlruns'}"
    cli = main(["fit", "--config", "configs/dpo/tiny.yaml", "--trainer.max_steps=2", "--trainer.log_every_n_steps=1",
                "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
                "--trainer.logger=MLFlowLogger", f"--trainer.logger.tracking_uri={uri}",
                "--trainer.logger.experiment_name=tiny", "--trainer.enable_progress_bar=false"])  # fmt: skip
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.get_run(cli.trainer.logger.run_id)
    assert {"train/loss", "val/loss", "val/rewards/accuracies"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1]
    assert run.data.params["model_name"] == "tiny-random-llama"  # the hyperparameters, as TensorBoard has them


def test_a_logger_that_refuses_its_settings_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """What a configured library class raises while it is built (here MLflow 3 refusing a folder
    store) is the user's setting to fix: one line naming the class and its reason, exit 2."""
    pytest.importorskip("mlflow")
    from dpo_lit.cli import main as console_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setattr("sys.argv", ["dpo-lit", "fit", "--config", str(ROOT / "configs/dpo/tiny.yaml"),
                                     "--trainer.logger=MLFlowLogger"])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dpo-lit: error: MLFlowLogger: MlflowException: The filesystem tracking backend")
    assert "MLFLOW_ALLOW_FILE_STORE=true" in err[-1] and "Traceback" not in "\n".join(err)


def test_wandb_records_the_run_offline_when_installed(tmp_path, monkeypatch):
    """pip install -e '.[wandb]': --trainer.logger=WandbLogger logs the run (offline here)."""
    pytest.importorskip("wandb")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cli = main(["fit", "--config", "configs/dpo/tiny.yaml", "--trainer.max_steps=2", "--trainer.log_every_n_steps=1",
                "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
                "--trainer.logger=WandbLogger", f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.project=tiny",
                "--trainer.enable_progress_bar=false"])  # fmt: skip
    experiment = cli.trainer.logger.experiment
    assert {"train/loss", "val/loss"} <= set(experiment.summary.keys())
    assert experiment.config["model_name"] == "tiny-random-llama"
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


def test_the_validation_report_mentions_val_kl_only_where_it_was_measured():
    from types import SimpleNamespace

    from dpo_lit.cli import validation_report

    def report(metrics):
        return validation_report(SimpleNamespace(callback_metrics=metrics, callbacks=[])).splitlines()[1]

    assert report({"val/loss": 0.69}) == "validation (held-out pairs)"
    assert report({"val/loss": 0.69, "val/kl": 0.01}) == "validation (held-out pairs; val/kl sampled from the policy)"


def test_the_usage_prints_without_importing_torch():
    """dpo-lit and dpo-lit --help answer at once: the entry point loads torch and Lightning only for
    a subcommand (they take seconds to import)."""
    code = ("import sys; from dpo_lit.console import main; sys.argv = ['dpo-lit', '--help']; main(); "
            "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("usage: dpo-lit {fit,validate,predict,") and lines[-1] == "[]"
