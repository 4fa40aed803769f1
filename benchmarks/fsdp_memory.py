"""Memory per process of full fine-tuning with a frozen reference copy: one process against FSDP2
over two (``configs/trainer/fsdp.yaml``), on the CPU with gloo.

    .venv/bin/python benchmarks/fsdp_memory.py                                   # SmolLM2-135M, 2 steps
    .venv/bin/python benchmarks/fsdp_memory.py --model tiny-random-llama --steps 2   # smoke run (seconds)

Each run is ``dpo-lit fit --config configs/dpo/smollm2_hh_full.yaml --model.reference copy`` (HH-RLHF
pairs, AdamW, float32), the FSDP2 run with half the per-process batch, so both see the same global
batches. A probe callback (:class:`MemoryProbe`) reports from every process: the bytes of the policy,
its gradients, the optimizer state and the reference copy that the process holds (its shards under
FSDP2), its resident set size once the models are set up (loaded, and sharded under FSDP2) and
after the last step, and its peak RSS over the run (loading included). Memory is measured, not
asserted; the figures are printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def _local_bytes(tensors) -> int:
    """Bytes of the tensors this process holds: a DTensor's own shard, a plain tensor whole."""
    total = 0
    for tensor in tensors:
        local = getattr(tensor, "_local_tensor", tensor)
        total += local.numel() * local.element_size()
    return total


try:
    from lightning import Callback
except ImportError:  # imported by the parent only for its argument parser
    Callback = object


class MemoryProbe(Callback):
    """Writes ``rank<R>.json`` into ``out``: what this process holds and its RSS (see the module doc)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.record: dict = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.record["rss_after_setup_gb"] = _rss_gb()

    def on_train_end(self, trainer, pl_module) -> None:
        policy = pl_module.trained_model
        frozen = getattr(pl_module.reference, "frozen", None)
        optimizer = trainer.optimizers[0]
        states = [v for state in optimizer.state.values() for v in state.values() if hasattr(v, "numel") and v.dim()]
        self.record.update(
            rank=trainer.global_rank, world_size=trainer.world_size,
            policy_gb=_local_bytes(policy.parameters()) / 1e9,
            gradients_gb=_local_bytes(p.grad for p in policy.parameters() if p.grad is not None) / 1e9,
            optimizer_gb=_local_bytes(states) / 1e9,
            reference_gb=_local_bytes(frozen.parameters()) / 1e9 if frozen is not None else 0.0,
            rss_at_end_gb=_rss_gb(),
            peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        )  # fmt: skip
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


def run(mode: str, args: argparse.Namespace, workdir: Path) -> list[dict]:
    out = workdir / mode
    batch = args.batch_size if mode == "one" else args.batch_size // 2
    command = [
        sys.executable, "-m", "dpo_lit", "fit", "--config", "configs/dpo/smollm2_hh_full.yaml",
        f"--model.model_name={args.model}", "--model.reference=copy", f"--trainer.max_steps={args.steps}",
        "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
        f"--data.max_examples={args.max_examples}", f"--data.batch_size={batch}", "--export.enabled=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        f"--trainer.default_root_dir={out}", "--trainer.callbacks+=fsdp_memory.MemoryProbe",
        f"--trainer.callbacks.out={out}",
    ]  # fmt: skip
    if mode == "fsdp2":
        command += ["--trainer", "configs/trainer/fsdp.yaml", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'benchmarks'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(args.threads), "DPO_LIT_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{mode} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="one process's batch (FSDP2: half per process)")
    parser.add_argument("--max-examples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fsdp-memory-") as tmp:
        rows = [{"mode": mode, **record} for mode in ("one", "fsdp2") for record in run(mode, args, Path(tmp))]
    columns = ["policy_gb", "gradients_gb", "optimizer_gb", "reference_gb", "rss_after_setup_gb", "rss_at_end_gb",
               "peak_rss_gb"]  # fmt: skip
    print(f"{args.model}, full fine-tuning, reference copy, AdamW, float32, {args.steps} steps; MB per process")
    print(f"{'run':<12}{'rank':>5}" + "".join(f"{c.removesuffix('_gb').replace('_', ' '):>16}" for c in columns))
    for row in rows:
        name = "one process" if row["mode"] == "one" else f"FSDP2 x {row['world_size']}"
        print(f"{name:<12}{row['rank']:>5}" + "".join(f"{row[c] * 1000:>16.1f}" for c in columns))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
