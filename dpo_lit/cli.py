"""``dpo-lit fit|validate|test|predict``: LightningCLI over PreferenceModule and PreferenceDataModule.

    dpo-lit fit --config configs/dpo/tiny.yaml
    dpo-lit fit --config configs/dpo/tiny.yaml --model.loss=IPOLoss --model.loss.beta=0.3
    dpo-lit validate --config configs/dpo/tiny.yaml --ckpt_path runs/.../checkpoints/last.ckpt
    dpo-lit fit --config configs/dpo/tiny.yaml --print_config
    dpo-lit predict --config configs/generate/everyday_vader.yaml   # sample, score, write pairs

``predict`` runs :class:`dpo_lit.generate.GenerationModule` over a prompt file instead of the
preference module: generation of on-policy pairs is its own model and data.
"""

from __future__ import annotations

import os
import sys

import torch
from lightning.pytorch.cli import LightningCLI

from dpo_lit.callbacks import ExportPretrained
from dpo_lit.data import DataError, PreferenceDataModule
from dpo_lit.module import PreferenceModule


class DPOLitCLI(LightningCLI):
    """LightningCLI whose tokenizer always follows the model, and which exports the policy."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name", "data.tokenizer_name")
        parser.add_lightning_class_args(ExportPretrained, "export")

    def after_validate(self) -> None:
        print(validation_report(self.trainer))


def validation_report(trainer) -> str:
    """Preference metrics, sampled KL and the capability table of the last validation, as text."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    lines = ["", "validation (held-out pairs; val/kl sampled from the policy)"]
    lines += [f"  {name:<28}{value:>12.4f}" for name, value in sorted(metrics.items())]
    for callback in trainer.callbacks:
        if getattr(callback, "table", None):
            lines += ["", "capability (reference = the model before training)", callback.format_table()]
    return "\n".join(lines)


def run(args: list[str] | None = None) -> DPOLitCLI:
    """Parse ``args`` (default: ``sys.argv``), run the subcommand, return the CLI object."""
    threads = os.environ.get("DPO_LIT_THREADS")
    if threads:  # explicit CPU thread count: two busy processes on few cores slow each other down
        torch.set_num_threads(int(threads))
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "predict":
        from dpo_lit.generate import GenerateCLI, GenerationModule, PromptDataModule

        return GenerateCLI(GenerationModule, PromptDataModule, save_config_callback=None, args=args)
    return DPOLitCLI(
        PreferenceModule,
        PreferenceDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,  # None: LightningCLI reads sys.argv itself
    )


def main() -> None:
    """Console entry point ``dpo-lit``: a user's mistake ends in one line, not a traceback.

    Bad data (file, line and field), a bad setting or a missing file are reported as
    ``dpo-lit: error: ...`` with exit status 2; ``DPO_LIT_DEBUG=1`` shows the traceback instead.
    """
    try:
        run()
    except (DataError, ValueError, FileNotFoundError) as error:
        if os.environ.get("DPO_LIT_DEBUG"):
            raise
        print(f"dpo-lit: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
