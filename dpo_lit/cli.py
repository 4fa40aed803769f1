"""``dpo-lit``, the one console script.

    dpo-lit fit --config configs/dpo/tiny.yaml                                 # train
    dpo-lit fit --config configs/dpo/tiny.yaml --config configs/loss/ipo.yaml  # configs stack
    dpo-lit validate --config configs/dpo/tiny.yaml --ckpt_path runs/.../checkpoints/last.ckpt
    dpo-lit predict --config configs/generate/everyday_vader.yaml              # sample, score, pair
    dpo-lit predict --config configs/generate/everyday_vader.yaml --model.model_name runs/.../merged
    dpo-lit onpolicy --config configs/quickstart/pipeline.yaml                 # generate → fit → measure
    dpo-lit fit --config configs/ppo/tiny.yaml                                 # PPO (model.class_path)
    dpo-lit compare --config configs/compare/everyday_vader.yaml               # DPO vs PPO, measured
    dpo-lit frontier --config configs/frontier/imdb_quick.yaml                 # IMDb reward-KL frontier
    dpo-lit sweep --config configs/dpo/tiny.yaml --grid model.loss.init_args.beta=0.05,0.1,0.5 --out_dir D
    dpo-lit plots runs/.../lightning_logs/version_0                            # PNGs of a run

``fit``/``validate`` are LightningCLI in subclass mode: the config's ``model.class_path``
and ``data.class_path`` pick the module and data module, :class:`~dpo_lit.module.PreferenceModule`
and :class:`~dpo_lit.data.PreferenceDataModule` when it names none (the RLHF stages name
:mod:`dpo_lit.rlhf`'s). ``predict`` runs :class:`~dpo_lit.sampling.predict.GenerationModule` over a
prompt file instead (generation of on-policy pairs is its own model and data); ``onpolicy`` and
``compare`` run :func:`~dpo_lit.pipelines.onpolicy.run_pipeline` and
:func:`~dpo_lit.pipelines.compare.run_compare`, which build their jobs from their configs with
:func:`build_cli` (or run them as child processes); ``sweep`` runs a grid of such commands. A
user's mistake (:class:`~dpo_lit.errors.UserError`) ends in one line and exit status 2; anything
else keeps its traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import LightningDataModule, LightningModule
from lightning.fabric.utilities.exceptions import MisconfigurationException
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
from dpo_lit.console import SUBCOMMANDS, USAGE
from dpo_lit.data import PreferenceDataModule
from dpo_lit.errors import ConfigError, UserError
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


def pipeline(command: str, argv: Sequence[str]) -> None:
    """``dpo-lit onpolicy`` / ``compare`` / ``frontier``: a pipeline of jobs, configured by its own YAML."""
    # The pipeline prints one line per stage and its own progress bars: no per-job banners (devices,
    # seeds, model summaries) and no bars for loading or writing weights.
    from huggingface_hub.utils import disable_progress_bars
    from jsonargparse import CLI
    from transformers.utils.logging import disable_progress_bar

    from dpo_lit.pipelines.compare import run_compare
    from dpo_lit.pipelines.frontier import run_frontier
    from dpo_lit.pipelines.onpolicy import run_pipeline

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    disable_progress_bar()
    disable_progress_bars()
    function = {"onpolicy": run_pipeline, "compare": run_compare, "frontier": run_frontier}[command]
    from jsonargparse import ArgumentError

    try:
        CLI(function, args=list(argv), as_positional=False, prog=f"dpo-lit {command}", exit_on_error=False)
    except ArgumentError as error:
        raise ConfigError(argument_error_line(str(error))) from None


class _NoAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip: try installing ..." adverts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


def quiet() -> None:
    """Console noise off: Lightning's adverts and warnings that say nothing about the user's run."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_NoAdverts())
    for message in (  # deprecations inside Lightning and transformers, not in anything a user wrote
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        r"`is_gradient_checkpointing` is deprecated",
    ):
        warnings.filterwarnings("ignore", message=message)
    # Lightning compares log_every_n_steps with one epoch's batches, but counts the interval in
    # optimizer steps across epochs: a run of short epochs still logs, and the warning misleads.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")
    # A new run's log folder is always a new version_N; a non-empty one is a resumed run's own.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def run(args: Sequence[str] | None = None) -> LightningCLI | None:
    """Run a subcommand from ``args`` (default: ``sys.argv[1:]``); return the CLI object, if any."""
    threads = os.environ.get("DPO_LIT_THREADS")
    if threads:  # explicit CPU thread count: two busy processes on few cores slow each other down
        torch.set_num_threads(int(threads))
    argv = list(sys.argv[1:] if args is None else args)
    command = argv[0] if argv else None
    if command in (None, "-h", "--help"):
        print(USAGE)
        return None
    if command == "test":  # Lightning's test loop: no module here defines a test step
        raise ConfigError(
            "dpo-lit has no test subcommand: measure the test data with dpo-lit validate --config ... "
            "--data.val_files <test file> (validation on the file given)"
        )
    if command not in SUBCOMMANDS:
        named = next((arg for arg in argv if arg in SUBCOMMANDS), None)
        if named:  # `dpo-lit --config X fit`: the order some CLIs take
            rest = " ".join(arg for arg in argv if arg != named)
            raise ConfigError(f"the subcommand comes first, then its options: dpo-lit {named} {rest}")
        raise ConfigError(f"unknown subcommand {command!r}; one of {', '.join(SUBCOMMANDS)} (dpo-lit --help)")
    if command in ("onpolicy", "compare", "frontier"):
        return pipeline(command, argv[1:])
    if command == "sweep":
        from dpo_lit.pipelines.sweep import main as sweep

        return sweep(argv[1:])
    if command == "plots":
        from dpo_lit.pipelines.plots import main as plots

        return plots(argv[1:])
    if command == "predict":
        return GenerateCLI(GenerationModule, PromptDataModule, save_config_callback=None, args=argv)
    return DPOLitCLI(args=argv)


def main() -> None:
    """Console entry point ``dpo-lit``: a user's mistake ends in one line, not a traceback.

    Bad data (file, line and field), a bad setting (its key) or a missing file are reported as
    ``dpo-lit: error: ...`` with exit status 2; ``DPO_LIT_DEBUG=1`` shows the traceback instead.
    """
    quiet()
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the user's own modules (a CallableReward's fn), as `python -m` does
    try:
        run()
    except Exception as error:
        mistake = user_error(error)
        if mistake is None or os.environ.get("DPO_LIT_DEBUG"):
            raise
        print(f"dpo-lit: error: {mistake}", file=sys.stderr)
        sys.exit(2)


def user_error(error: BaseException) -> UserError | None:
    """``error`` or the user's mistake it was raised from: jsonargparse wraps what a class raises
    while it is instantiated from a config ("Does not validate against any of the Union subtypes")."""
    seen, named = set(), None
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        if named is None and (found := re.search(r"Problem with given class_path '([^']+)'", str(error))):
            named = found.group(1)  # the class jsonargparse was instantiating
        if isinstance(error, ModuleNotFoundError):  # an optional package the chosen class needs (wandb, mlflow)
            what = named.rsplit(".", 1)[-1] if named else "a class the config names"
            return UserError(f"{what} needs a package that is not installed: {str(error).splitlines()[0]}")
        if (cause := _raised_by_configured_class(error)) is not None:
            return cause
        if isinstance(error, MisconfigurationException):  # Lightning's check of a trainer setting
            return UserError(f"trainer: {error}".replace("\n", " "))
        if isinstance(error, OSError) and error.errno in FILE_ERRNOS and error.filename:
            return UserError(f"{error.filename}: {error.strerror}")  # e.g. a log folder in a read-only place
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _raised_by_configured_class(error: BaseException) -> UserError | None:
    """What a library class named in the config (a logger, an optimizer, a callback) raised when it
    was built from the user's settings, which jsonargparse reports as a union of failed parses.
    dpo-lit's own classes are left out: what they raise is either a UserError already or a bug."""
    found = re.search(r"class_path='([\w.]+)'", str(error))
    cause = error.__cause__
    if not str(error).startswith("Does not validate against any of") or found is None or cause is None:
        return None
    if found.group(1).startswith("dpo_lit.") or type(cause).__module__.startswith(("jsonargparse", "dpo_lit")):
        return None
    reason = " ".join(str(cause).split()) or type(cause).__name__
    return UserError(f"{found.group(1).rsplit('.', 1)[-1]}: {type(cause).__name__}: {reason}")


# What a file or folder named in the config can meet that the user must fix: no permission, a
# read-only file system, a full disk or quota, a path through a file, a missing one.
FILE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
               errno.ENOENT}  # fmt: skip


if __name__ == "__main__":
    main()
