"""On-policy generation (dpo-lit predict) and the generate → fit → evaluate pipeline, on the tiny model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from dpo_lit.cli import run
from dpo_lit.pipelines.onpolicy import compare_on_prompts, run_pipeline
from dpo_lit.sampling.kl import mean_se


def test_predict_writes_pairs_with_sampled_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "pairs.jsonl"
    run(["predict", "--config", "configs/generate/tiny.yaml", f"--output.path={out}"])
    rows = [json.loads(line) for line in out.open()]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert len(rows) == summary["pairs"] == 8 - summary["prompts_without_pair"]
    for row in rows:
        assert row["chosen_score"] > row["rejected_score"]
        assert row["chosen_ids"] != row["rejected_ids"] and len(row["chosen_ids"]) <= 16
        # an unfinished completion keeps no EOS (id 257 in the tiny tokenizer)
        assert row["chosen_finished"] == (row["chosen_ids"][-1] == 257)


def test_compare_identical_models_gives_zero_gain_and_kl():
    from dpo_lit.models import load_model, load_tokenizer
    from dpo_lit.rewards import LengthReward

    model, tok = load_model("tiny-random-llama"), load_tokenizer("tiny-random-llama")
    result = compare_on_prompts(model, model, tok, ["Hi there.", "Tell me a story."], LengthReward(4), 3, 8, seed=5)
    assert result["gain"] == (0.0, 0.0)
    assert abs(result["kl"][0]) < 1e-5
    assert result["reference"] == result["policy"]


def test_standard_errors_are_over_prompts_in_the_onpolicy_comparison():
    """A reward that is the prompt's own value (1, 2, 6) makes the 4 samples of a prompt agree
    exactly: the reference's and the policy's reward errors are those of 3 prompt means,
    std([1, 2, 6]) / √3 = 1.528, as the paired gain's already was, not the std / √12 = 0.651 of 12
    independent draws."""
    from dpo_lit.models import load_model, load_tokenizer

    values = {"Hi there.": 1.0, "Tell me a story.": 2.0, "What is tea?": 6.0}

    class PromptValue:  # every sample of a prompt gets the same reward: perfectly correlated
        def __call__(self, prompts, completions, finished=None):
            return torch.tensor([values[p] for p in prompts])

    model, tok = load_model("tiny-random-llama"), load_tokenizer("tiny-random-llama")
    result = compare_on_prompts(model, model, tok, list(values), PromptValue(), 4, 6, seed=5)
    expected = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2) / math.sqrt(3)
    assert result["reference"] == pytest.approx((3.0, expected))
    assert result["policy"] == pytest.approx((3.0, expected))
    assert result["gain"] == (0.0, 0.0)


def test_mean_se():
    mean, se = mean_se(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and se == pytest.approx(torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item() / 2)


def test_tiny_pipeline_runs_two_rounds(tmp_path, monkeypatch):
    from dpo_lit.rewards import LengthReward

    monkeypatch.chdir(ROOT)
    reports = run_pipeline(
        generate_config="configs/generate/tiny.yaml", train_config="configs/quickstart/tiny_dpo.yaml",
        reward=LengthReward(target_words=4), model_name="tiny-random-llama", rounds=2,
        out_dir=str(tmp_path), eval_samples=2, eval_max_new_tokens=16,
    )
    assert [r.round for r in reports] == [1, 2]
    # each round trains on the pairs it wrote and samples the next round from its merged model
    for r in reports:
        pairs = tmp_path / f"round{r.round}" / "pairs.jsonl"
        assert r.pairs == sum(1 for _ in pairs.open()) > 0
        assert Path(r.model) == tmp_path / f"round{r.round}" / "lightning_logs" / "version_0" / "merged"
        assert set(r.seconds) == {"generate", "train", "evaluate"}
    # the reference and the evaluation seeds never change: its reward is the same number every round
    assert reports[0].reference_reward == reports[1].reference_reward
    assert reports[0].reference_reward_se == reports[1].reference_reward_se
    # the paired gain is the policy's reward minus the reference's (same samples per prompt)
    for r in reports:
        assert r.paired_gain == pytest.approx(r.policy_reward - r.reference_reward, abs=1e-6)
        assert r.kl > -3 * r.kl_se  # a KL: non-negative up to sampling noise
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [row["kl"] for row in saved] == [r.kl for r in reports]
    assert (tmp_path / "report.png").stat().st_size > 10_000


def _dpo_lit(*args: str) -> subprocess.CompletedProcess:
    """The console script as a user runs it (``python -m dpo_lit`` is the same entry point)."""
    return subprocess.run(
        [sys.executable, "-m", "dpo_lit", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


def test_onpolicy_command_runs_the_tiny_pipeline_quietly(tmp_path):
    done = _dpo_lit("onpolicy", "--config", "configs/quickstart/tiny_pipeline.yaml", "--out_dir", str(tmp_path),
                    "--rounds", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    console = done.stdout + done.stderr
    assert "LightningCLI's args parameter" not in console and "Tip:" not in console and "Traceback" not in console
    stages = [line.split("] ")[1].split(":")[0] for line in done.stdout.splitlines() if line.startswith("[round 1/1]")]
    assert stages == ["generate", "train", "evaluate"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report) == 1 and report[0]["pairs"] > 0


def test_onpolicy_bad_prompts_file_ends_in_one_line(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "Tell me about the sea."}\n{"prompt": 42}\n')
    done = _dpo_lit("onpolicy", "--config", "configs/quickstart/tiny_pipeline.yaml", "--out_dir", str(tmp_path),
                    "--train_prompts", str(bad))  # fmt: skip
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("dpo-lit: error: ") and f"{bad}:2" in lines[0] and "'prompt'" in lines[0]
