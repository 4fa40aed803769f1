"""``dpo-lit``, the one console script.

    dpo-lit fit --config configs/dpo/tiny.yaml                                 # train
    dpo-lit fit --config configs/dpo/tiny.yaml --config configs/loss/ipo.yaml  # configs stack
    dpo-lit validate --config configs/dpo/tiny.yaml --ckpt_path runs/.../checkpoints/last.ckpt
    dpo-lit predict --config configs/generate/everyday_vader.yaml              # sample, score, pair
    dpo-lit predict --config configs/generate/everyday_vader.yaml --model.model_name runs/.../merged
    dpo-lit onpolicy --config configs/quickstart/pipeline.yaml                 # generate → fit → measure
    dpo-lit fit --config configs/ppo/tiny.yaml                                 # PPO (model.class_path)
    dpo-lit compare --config configs/compare/tiny.yaml                         # every method, one budget, measured
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
:func:`~dpo_lit.jobs.build_cli` (or run them as child processes, :func:`~dpo_lit.jobs.run_stage`); ``sweep`` runs a grid of such commands. A
user's mistake (:class:`~dpo_lit.errors.UserError`) ends in one line and exit status 2; anything
else keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from dpo_lit.commands import SUBCOMMANDS, USAGE
from dpo_lit.errors import ConfigError, UserError
from dpo_lit.jobs import (  # noqa: F401  (DPOLitCLI, build_cli, ...: the CLI's names, re-exported)
    DPOLitCLI,
    GenerateCLI,
    argument_error_line,
    build_cli,
    override_args,
    validation_report,
)
from dpo_lit.sampling.predict import GenerationModule, PromptDataModule


def pipeline(command: str, argv: Sequence[str]) -> None:
    """``dpo-lit onpolicy`` / ``compare`` / ``frontier``: a pipeline of jobs, configured by its own YAML."""
    # The pipeline prints one line per stage and its own progress bars: no per-job banners (devices,
    # seeds, model summaries) and no bars for loading or writing weights.
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from jsonargparse import CLI, ArgumentError
    from transformers.utils import logging as transformers_logging

    from dpo_lit.pipelines.compare import run_compare
    from dpo_lit.pipelines.frontier import run_frontier
    from dpo_lit.pipelines.onpolicy import run_pipeline

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    bars = (transformers_logging.is_progress_bar_enabled(), not are_progress_bars_disabled())
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    transformers_logging.disable_progress_bar()
    disable_progress_bars()
    function = {"onpolicy": run_pipeline, "compare": run_compare, "frontier": run_frontier}[command]
    try:
        CLI(function, args=list(argv), as_positional=False, prog=f"dpo-lit {command}", exit_on_error=False)
    except ArgumentError as error:
        raise ConfigError(argument_error_line(str(error))) from None
    finally:  # as it was: a pipeline run in-process (a notebook, the tests) leaves the caller's logging alone
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars[0]:
            transformers_logging.enable_progress_bar()
        if bars[1]:
            enable_progress_bars()


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
    while cause.__cause__ is not None:  # jsonargparse's own wrapping, down to what the class raised
        cause = cause.__cause__
    if isinstance(cause, ModuleNotFoundError):
        return None  # an optional package: said by user_error's own line
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
