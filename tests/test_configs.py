"""configs/: every shipped config is registered by kind in configs/index.yaml, parses as its kind
says and points at real files (or at what an earlier stage writes); the tiny ones train."""

from pathlib import Path

import pytest
from conftest import CONFIGS, ROOT, configs
from conftest import parse_config as parse

from dpo_lit.cli import run as main
from dpo_lit.data.hub import HubSource, mirror_file, mirror_root
from dpo_lit.module import PreferenceModule
from dpo_lit.rlhf import RewardModule, SFTModule

RUN_CONFIGS = configs("fit")
GENERATE = configs("predict")
PIPELINES = configs("onpolicy")
COMPARES = configs("compare")
FRONTIERS = configs("frontier")
FRAGMENTS = configs("fragments/data")
# The online methods count optimizer updates (several per batch of prompts) and have their own
# tests (tests/test_rlhf.py, tests/test_online.py).
ONLINE = {"ppo", "rloo", "grpo", "online_dpo"}
TINY = [p for p in RUN_CONFIGS if p.name == "tiny.yaml" and p.parent.name not in ONLINE]
LOGGED = {  # what each module's tiny run logs, at least
    PreferenceModule: {"train/loss", "val/loss", "val/rewards/chosen", "val/logps/chosen"},
    SFTModule: {"train/loss", "val/loss", "val/ppl"},
    RewardModule: {"train/loss", "val/loss", "val/accuracy", "val/margin"},
}


def parse_function_config(function, path: Path):
    """A pipeline's YAML (``dpo-lit onpolicy | compare | frontier``) parsed against its function."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(function)
    return parser.parse_args(["--config", str(path)])


def assert_source_exists(config: Path, source: str) -> None:
    """A data file a config names exists (one under runs/ is written by an earlier step); a Hub
    split is in the local mirror, when one is set."""
    if source.startswith("hub:"):
        assert mirror_root() is None or mirror_file(HubSource.parse(source)), f"{config.name}: {source} not mirrored"
    elif not Path(source).is_relative_to(ROOT / "runs"):
        assert Path(source).is_file(), f"{config.name}: data file {source} not found"


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_parses_and_points_at_real_files(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a config's paths start at its own folder, wherever it is run from
    config = parse(["--config", str(path)])
    model, data = config.model.init_args, config.data.init_args
    assert model.model_name and data.tokenizer_name == model.model_name
    files = [v for k, v in vars(data).items() if k.endswith("_files") and v] + [
        [v] for k, v in vars(data).items() if k.endswith("_file") and v
    ]
    assert files, f"{path.name}: no data files"
    for file in sum(files, []):
        assert_source_exists(path, file)


@pytest.mark.parametrize("path", GENERATE, ids=lambda p: str(p.relative_to(ROOT)))
def test_generate_configs_parse(path, monkeypatch, tmp_path):
    from dpo_lit.cli import GenerateCLI
    from dpo_lit.sampling.predict import GenerationModule, PromptDataModule

    class ParseOnly(GenerateCLI):
        def instantiate_classes(self) -> None:
            pass

    monkeypatch.chdir(tmp_path)
    config = ParseOnly(GenerationModule, PromptDataModule, run=False, args=["--config", str(path)]).config
    assert config.data.tokenizer_name == config.model.model_name
    assert_source_exists(path, config.data.prompts_file)


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pipeline_configs_parse(path, monkeypatch, tmp_path):
    from dpo_lit.pipelines.onpolicy import run_pipeline

    monkeypatch.chdir(tmp_path)
    config = parse_function_config(run_pipeline, path)
    for key in ("generate_config", "train_config", "heldout_prompts"):
        assert Path(config[key]).is_file(), f"{path.name}: {key} {config[key]} not found"


@pytest.mark.parametrize("path", COMPARES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compare_configs_parse(path, monkeypatch, tmp_path):
    from dpo_lit.pipelines.compare import run_compare

    monkeypatch.chdir(tmp_path)
    config = parse_function_config(run_compare, path)
    for key in ("generate_config", "train_prompts", "heldout_prompts"):
        assert Path(config[key]).is_file(), f"{path.name}: {key} {config[key]} not found"
    assert config.reward["class_path"].startswith("dpo_lit.rewards.")
    for method in config.methods:  # each a fit config of the start model, with its overrides
        assert Path(method.config).is_file(), f"{path.name}: {method.name}: {method.config} not found"
        args = [f"--{k}={v}" for k, v in method.overrides.items()]
        model = parse(["--config", method.config, f"--model.model_name={config.model_name}", *args]).model
        assert (model.init_args.model_name if "init_args" in model else model.model_name) == config.model_name


@pytest.mark.parametrize("path", FRONTIERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_frontier_configs_parse(path, monkeypatch):
    from dpo_lit.pipelines.frontier import run_frontier

    monkeypatch.chdir(ROOT)
    config = parse_function_config(run_frontier, path)
    for key in ("sft_config", "generate_config", "dpo_config", "reward_config", "ppo_config", "rloo_config", "grpo_config"):
        assert Path(config[key]).is_file(), f"{path.name}: {key} {config[key]} not found"
    for key in ("sft_config", "dpo_config", "reward_config", "ppo_config", "rloo_config", "grpo_config"):  # and overrides
        stage = "ppo" if key in ("rloo_config", "grpo_config") else key.removesuffix("_config")  # PPO's overrides apply
        overrides = config[f"{stage}_overrides"] or {}
        parse(["--config", config[key], *[f"--{k}={v}" for k, v in overrides.items()]])


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: p.name)
def test_data_fragments_parse(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    config = parse(["--model.model_name", "tiny-random-llama", "--data", str(path)])
    for source in config.data.init_args.train_files + (config.data.init_args.val_files or []):
        assert_source_exists(path, source)


@pytest.mark.parametrize(
    "name, strategy", [("cpu", "auto"), ("ddp", "ddp"), ("fsdp", "FSDP2Strategy")]
)
def test_trainer_fragments_parse(name, strategy, monkeypatch):
    monkeypatch.chdir(ROOT)
    trainer = parse(["--config", "configs/dpo/tiny.yaml", "--trainer", f"configs/trainer/{name}.yaml"]).trainer
    assert strategy in str(trainer.strategy)


@pytest.mark.parametrize("path", TINY, ids=lambda p: str(p.relative_to(ROOT)))
def test_tiny_configs_fit_a_few_steps(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = main([
        "fit", "--config", str(path), "--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=3",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 3
    assert LOGGED[type(cli.model)] <= set(metrics)
    exported = "reward_model" if isinstance(cli.model, RewardModule) else "policy"
    assert (tmp_path / "lightning_logs" / "version_0" / exported / "config.json").is_file()


def test_every_config_is_registered_once_by_kind():
    shipped = sorted(p.relative_to(ROOT) for folder in ("configs", "experiments") for p in (ROOT / folder).rglob("*.yaml"))
    kinds = [kind for kind in CONFIGS if kind != "fragments"] + [f"fragments/{part}" for part in CONFIGS["fragments"]]
    registered = [p.relative_to(ROOT) for kind in kinds for p in configs(kind)]
    assert len(registered) == len(set(registered)), "a config registered twice"
    assert sorted(registered) == [p for p in shipped if p != Path("configs/index.yaml")]


@pytest.mark.parametrize("path", configs("fragments/callbacks"), ids=lambda p: p.name)
def test_callback_fragments_set_only_callbacks_and_stack_on_a_fit_config(path, monkeypatch):
    import yaml

    monkeypatch.chdir(ROOT)
    assert list(yaml.safe_load(path.read_text())) == ["trainer"] and list(yaml.safe_load(path.read_text())["trainer"]) == ["callbacks"]
    plain = parse(["--config", "configs/dpo/tiny.yaml"])
    stacked = parse(["--config", "configs/dpo/tiny.yaml", "--config", str(path)])
    names = [c.class_path.rsplit(".", 1)[-1] for c in stacked.trainer.callbacks]
    assert {"SampledKL", "SampleTable", "TrainingHealth", "CapabilityEval"} <= set(names)
    assert stacked.model == plain.model and stacked.data == plain.data
