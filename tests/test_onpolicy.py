"""On-policy generation (dpo-lit predict) and the generate → fit → evaluate pipeline, on the tiny model."""

import json
from pathlib import Path

import pytest
import torch

from dpo_lit.cli import run
from dpo_lit.pipelines.onpolicy import compare_on_prompts, run_pipeline
from dpo_lit.sampling.kl import mean_se

ROOT = Path(__file__).resolve().parents[1]


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
    assert (tmp_path / "round2" / "pairs.jsonl").is_file() and (tmp_path / "report.png").is_file()
    saved = json.loads((tmp_path / "report.json").read_text())
    assert len(saved) == 2 and all(r["kl"] == r["kl"] for r in saved)  # finite, not NaN
    assert Path(reports[1].model).name == "merged" and "round2" in reports[1].model
