"""The DPO step benchmark runs: its dpo-lit side on the tiny model, each packing, same tokens and losses.

Speed is not asserted (benchmarks print it); what is asserted is that the benchmark still drives the
current module and data module, and that packing changes the work done, not the result.
"""

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize("reference", ["precomputed", "copy"])
def test_dpo_step_benchmark_runs_and_packing_keeps_the_losses(tmp_path, shared_data, reference):
    results = {}
    for packing in ("none", "prefix"):
        out = tmp_path / f"{packing}.json"
        proc = subprocess.run(
            [sys.executable, "benchmarks/dpo_step.py", "--model", "tiny-random-llama", "--impl", "dpo-lit",
             "--variant", "full", "--full-reference", reference, "--steps", "2", "--warmup", "1",
             "--threads", "1", "--no-bf16", "--packing", packing, "--out", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"dpo-lit packing {packing}" in proc.stdout
        results[packing] = json.loads(out.read_text())["results"][0]
    padded, packed = results["none"], results["prefix"]
    assert packed["real_tokens"] == padded["real_tokens"] and sum(packed["real_tokens"]) > 0
    assert packed["losses"][0] == pytest.approx(0.693147, abs=1e-5)  # policy = reference at the first step
    assert packed["losses"] == pytest.approx(padded["losses"], abs=1e-5)


def test_big_vocabulary_benchmark_runs_with_and_without_the_fused_head(tmp_path):
    """--big-vocab: the 128,256-token model on token-id pairs; the fused head gives the plain head's
    losses (a learning rate large enough that the later steps' losses move)."""
    results = {}
    for fused in ("--fused-head", "--no-fused-head"):
        out = tmp_path / f"{fused}.json"
        proc = subprocess.run(
            [sys.executable, "benchmarks/dpo_step.py", "--big-vocab", "--impl", "dpo-lit", "--variant", "full",
             "--full-reference", "copy", "--length", "64", "--batch-size", "2", "--steps", "2", "--warmup", "1",
             "--lr", "1e-2", "--threads", "1", "--no-bf16", fused, "--out", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "vocabulary 128256" in proc.stdout and "CPU: " in proc.stdout
        results[fused] = json.loads(out.read_text())["results"][0]
    fused, plain = results["--fused-head"], results["--no-fused-head"]
    assert fused["real_tokens"] == [256, 256, 256]  # 2 pairs x 2 rows x 64 tokens a step, nothing cut
    assert fused["losses"][0] == pytest.approx(0.693147, abs=1e-5)
    assert abs(fused["losses"][-1] - fused["losses"][0]) > 1e-3  # training moved the policy
    assert fused["losses"] == pytest.approx(plain["losses"], abs=1e-4)


def test_fsdp_memory_benchmark_reports_each_process_and_the_shards_halve(tmp_path, shared_data):
    """benchmarks/fsdp_memory.py on the tiny model: a row per process, and under FSDP2 x 2 each
    process holds half of the policy, its gradients, the optimizer state and the reference copy."""
    out = tmp_path / "memory.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/fsdp_memory.py", "--model", "tiny-random-llama", "--steps", "2",
         "--max-examples", "16", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FSDP2 x 2" in proc.stdout
    one, *two = json.loads(out.read_text())
    assert one["mode"] == "one" and [row["rank"] for row in two] == [0, 1]
    for key in ("policy_gb", "gradients_gb", "optimizer_gb", "reference_gb"):
        assert one[key] > 0 and all(row[key] == pytest.approx(one[key] / 2, rel=0.02) for row in two), key
    assert all(row["peak_rss_gb"] >= row["rss_after_setup_gb"] > 0 for row in [one, *two])
