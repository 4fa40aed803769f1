"""The command line's Trainer: ``precision: auto`` (bf16 mixed precision where the hardware computes
bf16 fast, float32 where not) and integer validation intervals that count across epochs.

bf16 autocast is a large win or a large loss depending on the machine: on a GPU with bf16 and on a
CPU with AMX or AVX512-BF16 instructions a bf16 matmul runs several times faster than a float32 one
(a 2048² matmul on a Xeon with AMX: 974 against 116 GFLOPS, one thread), while a CPU without native
bf16 (AVX2 only) emulates it and ran our DPO step 4.5× slower than float32. ``auto`` picks from what
the process sees and says which, once. The frozen reference and the precomputed log-probs follow
the trainer's precision (the cache key names it), and so does sampling inside training (the
callbacks sample under the precision plugin's context).

Pinning ``32-true`` keeps a run's numbers the same on every machine: the README's measured configs
do that.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
from lightning import Trainer as LightningTrainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.trainer.connectors.accelerator_connector import _PRECISION_INPUT
from lightning.pytorch.utilities import rank_zero_info

AUTO = "auto"
FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matmuls


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The native-bf16 flags this CPU reports (Linux; none elsewhere)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [flag for flag in FAST_BF16_FLAGS if flag in flags]


def auto_precision(accelerator: str, cuda_bf16: bool | None = None, cpu_flags: list[str] | None = None) -> tuple[str, str]:
    """The precision ``auto`` stands for on ``accelerator`` (``auto``, ``cpu``, ``gpu``, ``cuda``, ...),
    and why. ``cuda_bf16`` and ``cpu_flags`` default to what this machine reports."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if cuda_bf16 is None:
            # native only: by default torch also says True where bf16 is emulated (V100, T4)
            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        if cuda_bf16:
            return "bf16-mixed", "a CUDA GPU with bf16"
        return "32-true", "a GPU without bf16 (fp16 needs loss scaling: ask for 16-mixed explicitly)"
    if accelerator in ("cpu", "auto"):
        flags = cpu_bf16_flags() if cpu_flags is None else cpu_flags
        if flags:
            return "bf16-mixed", f"a CPU with native bf16 ({', '.join(flags)})"
        return "32-true", "a CPU without native bf16 (AMX or AVX512-BF16), where bf16 autocast is emulated and slow"
    return "32-true", f"accelerator {accelerator!r}, whose bf16 speed dpo-lit does not know"


def _accelerator_name(accelerator: str | Accelerator) -> str:
    """``accelerator`` as a name :func:`auto_precision` knows (an instance by its type)."""
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    if isinstance(accelerator, str):
        return accelerator
    if isinstance(accelerator, CPUAccelerator):
        return "cpu"
    return "cuda" if isinstance(accelerator, CUDAAccelerator) else type(accelerator).__name__


class _WithoutVersion:
    """Lightning's progress bar without ``v_num``: the logger's version number, shown as a metric
    (``v_num: 0.000``), is the log folder's name, not something the run measured."""

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class RunProgressBar(_WithoutVersion, RichProgressBar):
    """Lightning's Rich progress bar, without ``v_num``."""


class RunTQDMProgressBar(_WithoutVersion, TQDMProgressBar):
    """Lightning's tqdm progress bar (where rich is not installed), without ``v_num``."""


class Trainer(LightningTrainer):
    """Lightning's Trainer as the command line builds it: ``precision="auto"`` is
    :func:`auto_precision`'s choice, and an integer ``val_check_interval`` counts training batches
    across epochs (``check_val_every_n_epoch=None``) unless an epoch interval other than 1 is given.

    Lightning counts an integer interval within each epoch and refuses one longer than the epoch, so a
    short run of a config made for a long one (``--data.max_examples 16``) would stop with a traceback.
    A run of fewer training batches than the interval (``--trainer.max_steps 2`` of a config that
    validates every 50) validates once, at its last batch, instead of never. The progress bar, unless
    one is given or it is off, is Lightning's without ``v_num``.
    """

    def __init__(
        self, *args, accelerator: str | Accelerator = "auto", precision: _PRECISION_INPUT | Literal["auto"] | None = None,
        val_check_interval: int | float | str | timedelta | dict[str, int] | None = None, check_val_every_n_epoch: int | None = 1, **kwargs,
    ) -> None:
        if precision == AUTO:
            precision, why = auto_precision(_accelerator_name(accelerator))
            rank_zero_info(f"trainer.precision=auto: {precision} on {why}")
        if isinstance(val_check_interval, int) and check_val_every_n_epoch == 1:
            check_val_every_n_epoch = None
        last_batch = kwargs.get("max_steps", -1) * kwargs.get("accumulate_grad_batches", 1)
        if isinstance(val_check_interval, int) and check_val_every_n_epoch is None and 0 < last_batch < val_check_interval:
            val_check_interval = last_batch  # a run shorter than the interval still validates, at its end
        if kwargs.get("enable_progress_bar") is not False:
            callbacks = kwargs.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
            if not any(isinstance(callback, ProgressBar) for callback in callbacks):
                kwargs["callbacks"] = [*callbacks, RunProgressBar() if _RICH_AVAILABLE else RunTQDMProgressBar()]
        super().__init__(
            *args, precision=precision, accelerator=accelerator, val_check_interval=val_check_interval,
            check_val_every_n_epoch=check_val_every_n_epoch, **kwargs,
        )
