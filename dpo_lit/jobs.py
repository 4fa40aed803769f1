"""Jobs: the LightningCLI objects behind ``dpo-lit fit | validate | predict``, built from configs
and dotted-key overrides in this process (:func:`build_cli`) or run as a child process
(:func:`run_stage`). :mod:`dpo_lit.cli` dispatches the command line to them; the pipelines
(:mod:`dpo_lit.pipelines`) build their stages with them. Imports point one way: cli -> pipelines ->
jobs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from dpo_lit.callbacks import (
    EpochsFromSteps,
    ExportPretrained,
    LastCheckpoint,
    NonFiniteGuard,
    StepFromCheckpoint,
)
from dpo_lit.data import PreferenceDataModule
from dpo_lit.errors import ConfigError
from dpo_lit.module import PreferenceModule
from dpo_lit.sampling.predict import GenerationModule, PromptDataModule, WritePairs
from dpo_lit.trainer import Trainer, cpu_bf16_flags


class _ArgsFromCode(LightningCLI):
    """LightningCLI that takes ``args`` from this package's own code without warning.

    LightningCLI warns when ``args`` are given while ``sys.argv`` holds arguments, to catch scripts
    that silently ignore their command line; :func:`build_cli` passes a job's own arguments on
    purpose while ``sys.argv`` holds the pipeline's.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("trainer_class", Trainer)  # trainer.precision may be "auto"
        # The module configures its own optimizer and schedule (model.optimizer, model.scheduler):
        # Lightning's --optimizer/--lr_scheduler would silently replace them and drop the schedule.
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("exit_on_error", False)  # a bad option ends in one line (parse_arguments), not the usage
        kwargs.setdefault("allow_abbrev", False)  # --trainer.max_step is a typo, not max_steps
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        from jsonargparse import ArgumentError

        try:
            self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(args)
        except ArgumentError as error:
            raise ConfigError(argument_error_line(str(error))) from None


def argument_error_line(message: str) -> str:
    """jsonargparse's multi-line report of a bad option as one line: the key and what is wrong,
    without the list of union subtypes tried and the value's repr."""
    noise = ("Does not validate against any of", "Subtypes:", "Errors:", "Expected a <class 'NoneType'>",
             "Given value type:")  # fmt: skip
    parts = [
        line.strip(" -") for line in message.splitlines()
        if line.strip() and not line.strip(" -").startswith(noise)
        and not (line.strip().startswith("Given value:") and len(line) > 80)  # a whole config section
    ]  # fmt: skip
    line = re.sub(r"""(?:Parser key|Key) "([^"]+)":""", r"\1:", " ".join(parts))
    line = re.sub(r"Problem with given class_path '[^']+': ", "", line)
    # jsonargparse's repr of a nested option ("Given value: NestedArg(key='loss.beta', val='abc')")
    line = re.sub(r"\s*Given value: NestedArg\(key='([^']*)', val=(.*?)\)(?=\s|$)", r" (given: \1=\2)", line)
    return f"{line} (--help lists the options)"


def command_parser(command: str, description: str):
    """The parser of a subcommand that is not a Lightning job (``sweep``, ``plots``): jsonargparse,
    as under LightningCLI, so a bad option ends in the same one line (:func:`parse_command`)."""
    from jsonargparse import ArgumentParser

    return ArgumentParser(prog=f"dpo-lit {command}", description=description, exit_on_error=False, allow_abbrev=False)


def parse_command(parser, argv: Sequence[str]):
    """``parser``'s namespace for ``argv``; a bad or missing option is a ConfigError of one line."""
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(list(argv))
    except ArgumentError as error:
        raise ConfigError(argument_error_line(str(error))) from None


class DPOLitCLI(_ArgsFromCode):
    """``fit``/``validate``/``test`` in subclass mode: ``model.class_path`` and ``data.class_path``
    pick the module and the data module, :class:`~dpo_lit.module.PreferenceModule` and
    :class:`~dpo_lit.data.PreferenceDataModule` when a config names none (so DPO configs need no
    ``class_path``). The tokenizer always follows the model; the trained model is exported."""

    DEFAULTS = {
        "model": f"{PreferenceModule.__module__}.{PreferenceModule.__name__}",
        "data": f"{PreferenceDataModule.__module__}.{PreferenceDataModule.__name__}",
    }

    def __init__(self, **kwargs) -> None:
        super().__init__(
            LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [LastCheckpoint(), EpochsFromSteps(), NonFiniteGuard(), StepFromCheckpoint()]},  # whatever the config
            **kwargs,
        )  # fmt: skip

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({key: {"class_path": path} for key, path in self.DEFAULTS.items()})
        parser.link_arguments("model.init_args.model_name", "data.init_args.tokenizer_name")
        parser.add_lightning_class_args(ExportPretrained, "export")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse; when a config names another class, parse again with that class as the default.

        jsonargparse keeps the init_args a new ``class_path`` shares with the previous one, so
        without the second pass a PPOModule would inherit PreferenceModule's defaults for
        ``scheduler`` and ``warmup_ratio`` instead of its own.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        chosen = {key: config[key].class_path for key in self.DEFAULTS}
        if chosen != self.DEFAULTS:
            (self._subcommand_parsers[subcommand] if subcommand else parser).set_defaults(
                {key: {"class_path": path} for key, path in chosen.items()}
            )
            super().parse_arguments(parser, args)

    def before_fit(self) -> None:
        warn_slow_bf16(self.trainer)
        self._read_data("fit")
        self._find_last_checkpoint()
        self._continue_log_folder()

    def _read_data(self, stage: str) -> None:
        """Read and tokenize the data before the trainer starts (its ``setup`` keeps what it read):
        a bad or unreachable data set stops the run before any log folder is made."""
        if self.datamodule is not None:
            self.datamodule.setup(stage)

    def _continue_log_folder(self) -> Path | None:
        """A fit resumed from a checkpoint inside a log folder of the trainer's logger (``version_N``)
        logs into that folder again: one TensorBoard run, one ``config.yaml`` (the resumed run's) and
        its checkpoints where they were, instead of a new ``version_N+1`` holding the second half.
        ``validate`` of such a checkpoint logs there too (its metrics at the checkpoint's step).
        Returns the folder, or None when the run logs into a new one."""
        ckpt = self.config_init[self.subcommand].get("ckpt_path")
        logger = self.trainer.logger
        if not ckpt or len(self.trainer.loggers) != 1 or not isinstance(logger, (TensorBoardLogger, CSVLogger)):
            return None
        folder = Path(ckpt).resolve().parent.parent  # <save_dir>/<name>/<version>/checkpoints/last.ckpt
        pinned = getattr(logger, "_version", None) is not None  # the user named a version: theirs
        if pinned or folder.parent != (Path(logger.save_dir) / (logger.name or "")).resolve():
            return None
        version = folder.name
        if version.startswith("version_") and version[len("version_"):].isdigit():
            version = int(version[len("version_"):])
        self.trainer.loggers = [type(logger)(save_dir=logger.save_dir, name=logger.name, version=version)]
        rank_zero_info(f"{'resuming' if self.subcommand == 'fit' else 'logging'} in {folder}")
        return folder

    def before_validate(self) -> None:
        self._read_data("validate")
        self._find_last_checkpoint()
        if self._continue_log_folder():  # the training run's folder: keep its config.yaml as it is
            for callback in self.trainer.callbacks:
                if isinstance(callback, SaveConfigCallback):
                    callback.config_filename = "validate_config.yaml"
        self.config_init[self.subcommand]["verbose"] = False  # after_validate prints the metrics, once

    def after_validate(self) -> None:
        print(validation_report(self.trainer))

    def _find_last_checkpoint(self) -> None:
        """``--ckpt_path last``: the newest ``last*.ckpt`` of any earlier run under the trainer's
        ``default_root_dir`` (Lightning looks only in this run's new, empty version folder). A fit
        with none starts from the beginning and says so; validate stops."""
        kwargs = self.config_init[self.subcommand]
        if kwargs.get("ckpt_path") != "last":
            return
        root = Path(self.trainer.default_root_dir)
        found = sorted(root.glob("**/last*.ckpt"), key=lambda path: path.stat().st_mtime)
        if found:
            kwargs["ckpt_path"] = str(found[-1])
            rank_zero_info(f"ckpt_path=last: {found[-1]}")
        elif self.subcommand == "fit":
            kwargs["ckpt_path"] = None
            rank_zero_info(f"ckpt_path=last: no last.ckpt under {root} yet; training from the start")
        else:
            raise ConfigError(f"ckpt_path: no last.ckpt under {root} (trainer.default_root_dir); give a checkpoint path")


def warn_slow_bf16(trainer) -> None:
    """bf16 autocast on a CPU without native bf16 instructions emulates them: say so once."""
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.utilities import rank_zero_warn

    if isinstance(trainer.accelerator, CPUAccelerator) and "bf16" in str(trainer.precision) and not cpu_bf16_flags():
        rank_zero_warn(
            f"trainer.precision={trainer.precision} on a CPU without native bf16 (AMX or AVX512-BF16): bf16 autocast "
            "ran 4.5x slower than float32 on such a CPU; --trainer.precision auto (or 32-true) is faster here"
        )


class GenerateCLI(_ArgsFromCode):
    """``predict``: the tokenizer follows the model; the pairs are written."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name", "data.tokenizer_name")
        parser.add_lightning_class_args(WritePairs, "output")


def validation_report(trainer) -> str:
    """Preference metrics, sampled KL and the capability table of the last validation, as text."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    sampled = "; val/kl sampled from the policy" if "val/kl" in metrics else ""  # only where a KL was measured
    lines = ["", f"validation (held-out pairs{sampled})"]
    lines += [f"  {name:<28}{value:>12.4f}" for name, value in sorted(metrics.items())]
    for callback in trainer.callbacks:
        if getattr(callback, "table", None):
            lines += ["", "capability (reference = the model before training)", callback.format_table()]
    return "\n".join(lines)


def override_args(overrides: dict[str, Any] | None) -> list[str]:
    """Dotted-key overrides as command-line arguments: ``{"data.train_files": ["a.jsonl"]}`` ->
    ``['--data.train_files=["a.jsonl"]']`` (non-strings as JSON)."""
    return [f"--{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in (overrides or {}).items()]


def build_cli(
    command: Literal["fit", "predict"], configs: Sequence[str], overrides: dict[str, Any] | None = None
) -> LightningCLI:
    """Parse config files (stacked, later ones win) and dotted-key overrides, instantiate the
    trainer, module and data module of ``command``'s job, and return the CLI object without
    running it: ``cli.trainer.fit(cli.model, datamodule=cli.datamodule)``.

    Args:
        command: ``fit`` (preference training) or ``predict`` (sample, score, pair).
        configs: YAML files, as ``--config`` would take them.
        overrides: ``{"model.model_name": "...", "data.train_files": [...]}``.
    """
    args = [arg for path in configs for arg in ("--config", path)]
    args += override_args(overrides)
    if command == "predict":
        return GenerateCLI(GenerationModule, PromptDataModule, save_config_callback=None, args=args, run=False)
    return DPOLitCLI(args=args, run=False)


@dataclass
class Stage:
    """One child process: its wall time and peak resident set size."""

    seconds: float
    peak_rss_gb: float


def run_stage(args: list[str], caller: str = "dpo-lit compare") -> Stage:
    """``dpo-lit ARGS`` in a child process; stops ``caller`` (the pipeline that runs it) if the child fails."""
    start = time.time()
    process = subprocess.Popen([sys.executable, "-m", "dpo_lit", *args])
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{caller}: `dpo-lit {' '.join(args[:3])} ...` failed (exit {process.returncode})")
    return Stage(time.time() - start, usage.ru_maxrss / 1024**2)  # ru_maxrss is in KiB on Linux
