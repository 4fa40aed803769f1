"""What both sides of the DPO step benchmark share: the run's spec, the step clock, RSS readings.

Imported by ``_side_dpolit.py`` (the project's venv) and ``_side_trl.py`` (``benchmarks/.venv-trl``),
so it needs nothing beyond the standard library and torch.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Spec:
    """One configuration to measure; the parent writes it as JSON, a child reads it."""

    impl: str  # "dpo-lit" or "trl"
    variant: str  # "lora" or "full"
    model_path: str  # a local folder (aliases are resolved by the parent)
    pairs_jsonl: str  # implicit-format records (chosen/rejected transcripts), for PreferenceDataModule
    pairs_json: str  # the same pairs as prompt/chosen/rejected strings, in training order, for TRL
    out_dir: str
    reference: str  # lora: "adapter"; full: "precomputed" or "copy"
    steps: int = 8
    warmup: int = 2
    batch_size: int = 4
    max_length: int = 512
    max_prompt_length: int = 384
    beta: float = 0.1
    lr: float = 2e-4
    max_grad_norm: float = 1.0
    bf16: bool = True
    threads: int = 2
    seed: int = 0
    lora_r: int = 16
    lora_alpha: int = 32
    packing: str = "prefix"  # dpo-lit's model.packing (TRL's rows are always padded)
    tokenized: bool = False  # pairs are token ids (prompt_ids/chosen_ids/rejected_ids), trained on as given
    fused_head: bool = True  # dpo-lit's model.fused_head

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Spec:
        return cls(**json.loads(Path(path).read_text()))


def rss_gb() -> float:
    """Current resident set size of this process (GB, from /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (getrusage's ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


@dataclass
class StepClock:
    """Step-end timestamps and what each step trained on.

    s/step is the wall time from the end of the last warm-up step to the end of the last step,
    divided by the timed steps: it covers fetching and collating the batch, forward, backward,
    gradient clipping, the optimizer step and the framework's per-step bookkeeping and logging.
    """

    warmup: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds outside the steps
    train_start: float | None = None
    ends: list[float] = field(default_factory=list)
    real_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # token positions the model ran: padding and repeats included
    threads: int | None = None
    setup_peak_rss_gb: float | None = None
    setup_rss_gb: float | None = None
    checked: dict = field(default_factory=dict)  # settings read back from the running trainer

    def start(self, model, precision: str) -> None:
        """Training is about to start: model, data, optimizer (and precompute) are ready."""
        import torch

        checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        self.checked = {"precision": str(precision), "activation_checkpointing": checkpointing}
        self.train_start = time.perf_counter()
        self.threads = torch.get_num_threads()
        self.setup_peak_rss_gb, self.setup_rss_gb = peak_rss_gb(), rss_gb()

    def step_end(self, real_tokens: int, completion_tokens: int, loss: float, positions: int) -> None:
        self.ends.append(time.perf_counter())
        self.positions.append(int(positions))
        self.real_tokens.append(int(real_tokens))
        self.completion_tokens.append(int(completion_tokens))
        self.losses.append(float(loss))

    def summary(self) -> dict:
        if len(self.ends) <= self.warmup:
            raise RuntimeError(f"only {len(self.ends)} steps ran; {self.warmup} warm-up steps need more")
        since = self.ends[self.warmup - 1] if self.warmup else self.train_start
        seconds = self.ends[-1] - since
        timed = len(self.ends) - self.warmup
        tokens = sum(self.real_tokens[self.warmup :])
        step_seconds = [b - a for a, b in zip([self.train_start, *self.ends[:-1]], self.ends)]
        return {
            "timed_steps": timed,
            "timed_seconds": seconds,
            "s_per_step": seconds / timed,
            "tokens_per_s": tokens / seconds,
            "completion_tokens_per_s": sum(self.completion_tokens[self.warmup :]) / seconds,
            "step_seconds": step_seconds,
            "real_tokens": self.real_tokens,
            "completion_tokens": self.completion_tokens,
            "losses": self.losses,
            "positions": self.positions,
            "threads": self.threads,
            "checked": self.checked,
            "setup_peak_rss_gb": self.setup_peak_rss_gb,
            "setup_rss_gb": self.setup_rss_gb,
            **self.timings,
        }


def finish(spec: Spec, clock: StepClock, wall_start: float) -> None:
    """Write the child's result (``out_dir/result.json``) with the process's final peak RSS."""
    import torch

    result = {
        "impl": spec.impl,
        "variant": spec.variant,
        "reference": spec.reference,
        **clock.summary(),
        "peak_rss_gb": peak_rss_gb(),
        "wall_seconds": time.perf_counter() - wall_start,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    (Path(spec.out_dir) / "result.json").write_text(json.dumps(result, indent=1))
