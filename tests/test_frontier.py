"""The IMDb reward-KL frontier (dpo_lit/pipelines/frontier.py): the sentiment classifier, the
prefixes, the held-out reward/KL measurement and the whole pipeline on the tiny model."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from dpo_lit.callbacks.reward_kl import reward_and_kl, sample_and_score
from dpo_lit.data.prompts import encode_prompts
from dpo_lit.models import load_model, load_tokenizer
from dpo_lit.pipelines.frontier import make_prefixes
from dpo_lit.pipelines.frontier_report import (
    COLUMNS,
    JUDGED_COLUMNS,
    judge_samples,
    paired_gain,
    read_frontier_csv,
    vader_accuracy,
    write_frontier_png,
)  # fmt: skip
from dpo_lit.rewards import VaderSentiment
from dpo_lit.rewards.classifier import SentimentClassifier, clean_review, train_sentiment_classifier

SENTIMENT = ROOT.parent / "shared" / "data" / "sentiment"
TRAIN, TEST = str(SENTIMENT / "imdb_train.jsonl.gz"), str(SENTIMENT / "imdb_test.jsonl.gz")

needs_imdb = pytest.mark.skipif(not Path(TRAIN).is_file(), reason="../shared/data/sentiment is not beside the project")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> dict:
    return train_sentiment_classifier(TRAIN, TEST, tmp_path_factory.mktemp("clf"), max_examples=3000)


@needs_imdb
def test_classifier_learns_sentiment_from_a_sample_of_imdb(classifier):
    # 3,000 of the 25,000 training reviews, measured on all 25,000 test reviews: well above chance
    # (the full set gives about 0.90, what make imdb-frontier uses).
    assert classifier["test_examples"] == 25000 and classifier["train_examples"] == 3000
    assert 0.80 <= classifier["test_accuracy"] <= 0.95
    info = json.loads((Path(classifier["path"]).parent / "classifier.json").read_text())
    assert info["test_accuracy"] == classifier["test_accuracy"] and "logistic regression" in info["classifier"]
    reward = SentimentClassifier(classifier["path"])
    scores = reward(["This movie was"] * 2, [" wonderful, moving and beautifully acted.", " dull, stupid and a waste of time."])
    assert scores.shape == (2,) and 0 <= float(scores.min()) and float(scores.max()) <= 1
    assert scores[0] > 0.7 and scores[1] < 0.3


@needs_imdb
def test_prefixes_are_2_to_8_tokens_of_distinct_reviews_and_reproducible():
    tokenizer = load_tokenizer("tiny-random-llama")
    prefixes = make_prefixes(TEST, tokenizer, 40, 2, 8, seed=3)
    assert len(prefixes) == 40 and len({p["source"] for p in prefixes}) == 40
    lengths = [len(tokenizer.encode(p["prompt"], add_special_tokens=False)) for p in prefixes]
    assert min(lengths) >= 1 and max(lengths) <= 9  # re-encoding a cut text may merge or split one token
    assert len(set(lengths)) > 3  # drawn across the range, not one length
    assert make_prefixes(TEST, tokenizer, 40, 2, 8, seed=3) == prefixes
    assert make_prefixes(TEST, tokenizer, 40, 2, 8, seed=4) != prefixes


def test_reward_and_kl_of_a_model_against_itself_is_zero_and_paired_by_seed():
    tokenizer = load_tokenizer("tiny-random-llama")
    model = load_model("tiny-random-llama")
    prompts = ["This film", "I watched it twice and"]
    ids = encode_prompts(tokenizer, prompts, chat=False)

    class Letters:  # a reward that depends on the sampled text
        def __call__(self, prompts, completions, finished=None):
            return torch.tensor([float(len(c)) for c in completions])

    point = reward_and_kl(model, model, contextlib.nullcontext, tokenizer, prompts, ids, Letters(), 3, 8, 4, seed=5)
    assert point.kl == pytest.approx(0.0, abs=1e-5) and point.kl_se == pytest.approx(0.0, abs=1e-5)
    again = reward_and_kl(model, model, contextlib.nullcontext, tokenizer, prompts, ids, Letters(), 3, 8, 4, seed=5)
    assert again.reward == point.reward and point.reward_se > 0
    # the samples behind the point: 3 per prompt, each with its text, its reward and its log-ratio
    samples = sample_and_score(model, model, contextlib.nullcontext, tokenizer, prompts, ids, Letters(), 3, 8, 4, 5, 7)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1] and {s.step for s in samples} == {7}
    assert [s.prompt for s in samples[2:4]] == prompts
    assert [s.reward for s in samples] == [float(len(s.completion)) for s in samples]
    assert sum(s.reward for s in samples) / 6 == pytest.approx(point.reward)


def _se_over_prompts(per_prompt: list[float]) -> float:
    """The standard error of the mean of the prompts' own values, worked out long-hand."""
    mean = sum(per_prompt) / len(per_prompt)
    return math.sqrt(sum((v - mean) ** 2 for v in per_prompt) / (len(per_prompt) - 1) / len(per_prompt))


def test_standard_errors_are_over_prompts_in_heldout_reward_and_kl():
    """A reward that is the prompt's own value (1, 2, 6) makes the 4 samples of a prompt agree
    exactly: HeldoutRewardKL's reward error is that of 3 prompt means, 1.528, not the std / √12 =
    0.651 of 12 independent draws; its KL error is over the prompts' mean log-ratios too."""
    tokenizer, model = load_tokenizer("tiny-random-llama"), load_model("tiny-random-llama")
    reference = load_model("tiny-random-llama")
    with torch.no_grad():  # another model, so that the log-ratios vary
        for weight in reference.parameters():
            weight.add_(0.2 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(weight.numel())))
    values = {"This film": 1.0, "I watched it twice and": 2.0, "The ending": 6.0}
    prompts = list(values)

    class PromptValue:  # every sample of a prompt gets the same reward: perfectly correlated
        def __call__(self, prompts, completions, finished=None):
            return torch.tensor([values[p] for p in prompts])

    ids = encode_prompts(tokenizer, prompts, chat=False)
    args = (model, reference, contextlib.nullcontext, tokenizer, prompts, ids, PromptValue(), 4, 6, 4, 5)
    point = reward_and_kl(*args)
    assert (point.reward, point.reward_se) == pytest.approx((3.0, _se_over_prompts([1.0, 2.0, 6.0])))
    assert point.reward_se == pytest.approx(1.5275, abs=1e-4)
    ratios = torch.tensor([s.log_ratio for s in sample_and_score(*args)]).view(3, 4)  # (P, k), same draws
    assert point.kl_se == pytest.approx(_se_over_prompts(ratios.mean(-1).tolist()))
    assert abs(point.kl_se - ratios.std().item() / math.sqrt(12)) > 0.01  # not the SE over samples


def test_standard_errors_are_over_prompts_in_judged_csv(tmp_path):
    """judged.csv's VADER error: 3 samples of each of 3 prompts, identical within a prompt, so the
    error is std over the 3 prompts' scores / √3 (the 9 samples as independent draws gave less)."""
    texts = {0: ("I loved this film, ", "it was wonderful."), 1: ("It was terrible ", "and boring."),
             2: ("An ordinary film ", "about a town.")}  # fmt: skip
    for name in ("sft-point", "dpo"):
        rows = [{"method": name, "setting": "", "step": 0, "prompt_index": p, "prompt": prompt, "completion": completion,
                 "reward": float(p), "log_ratio": 0.0, "finished": True}
                for p, (prompt, completion) in texts.items() for _ in range(3)]  # fmt: skip
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    per_prompt = VaderSentiment()([""] * 3, [clean_review(a + b) for a, b in texts.values()], None).tolist()
    assert len(set(per_prompt)) == 3  # three different scores: a spread over prompts to measure
    for row in judge_samples(tmp_path):
        assert row["vader"] == pytest.approx(sum(per_prompt) / 3)
        assert row["vader_se"] == pytest.approx(_se_over_prompts(per_prompt))


def test_paired_gain_removes_the_prompts_own_spread():
    # two prompts far apart, the policy better by exactly 0.1 on each: the paired gain is 0.1 with
    # no spread at all, while the marginal means differ by 0.1 with a spread of about 0.5
    base = {0: [0.0, 0.2], 1: [0.9, 0.9]}
    policy = {0: [0.1, 0.3], 1: [1.0, 1.0]}
    assert paired_gain(policy, base) == pytest.approx((0.1, 0.0))
    assert paired_gain({0: [1.0], 1: [0.0], 2: [0.5]}, {0: [0.0], 1: [0.0], 2: [0.0]}) == pytest.approx((0.5, 0.5 / 3**0.5))
    with pytest.raises(ValueError, match="different prompts"):
        paired_gain({0: [1.0]}, {1: [1.0]})


@needs_imdb
def test_vader_second_judge_agrees_with_imdb_labels_better_than_chance():
    # VADER knows nothing of IMDb: on reviews it is right about 7 times in 10 (the classifier 9)
    info = vader_accuracy(TEST, limit=400, seed=1)
    assert info["test_examples"] == 400 and 0.6 <= info["test_accuracy"] <= 0.85


def test_frontier_png_draws_every_run(tmp_path):
    rows = [
        {"method": "sft", "setting": "", "step": 0, "reward": 0.5, "reward_se": 0.02, "kl": 0.0, "kl_se": 0.0},
        {"method": "dpo", "setting": "beta=0.1", "step": 4, "reward": 0.7, "reward_se": 0.03, "kl": 2.0, "kl_se": 0.2},
        {"method": "dpo", "setting": "beta=0.1", "step": 8, "reward": 0.8, "reward_se": 0.03, "kl": 3.0, "kl_se": 0.3},
    ]
    path = write_frontier_png(rows, tmp_path / "f.png")
    assert path.stat().st_size > 10_000


@needs_imdb
@pytest.mark.slow
def test_frontier_pipeline_end_to_end_on_the_tiny_model(tmp_path):
    out = tmp_path / "frontier"
    env = {**os.environ, "DPO_LIT_THREADS": "2"}
    command = [sys.executable, "-m", "dpo_lit", "frontier", "--config", "configs/frontier/tiny.yaml", "--out_dir", str(out)]
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]

    info = json.loads((out / "classifier.json").read_text())
    assert info["test_accuracy"] >= 0.75 and info["train_examples"] == 2000
    assert (out / "frontier.png").stat().st_size > 10_000
    with open(out / "frontier.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    rows = read_frontier_csv(out / "frontier.csv")
    runs = {(r["method"], r["setting"]): [] for r in rows}
    for r in rows:
        runs[(r["method"], r["setting"])].append(r["step"])
    assert runs == {
        ("sft", ""): [0],
        ("dpo", "beta=0.1"): [2, 4], ("dpo", "beta=1"): [2, 4], ("preferred-ft", ""): [2, 4],
        ("ppo-gt", "kl_coef=0.05"): [2, 4], ("ppo-rm", "kl_coef=0.05"): [2, 4],
        ("rloo", "kl_coef=0.05"): [2, 4],
        ("grpo", "kl_coef=0.04"): [4],  # 2 epochs x 2 minibatches: one batch of prefixes makes all 4 updates
    }  # fmt: skip
    assert all(math.isfinite(r[k]) for r in rows for k in COLUMNS[3:])
    assert all(0 <= r["reward"] <= 1 and r["reward_se"] > 0 and r["kl_se"] >= 0 for r in rows)
    start = next(r for r in rows if r["method"] == "sft")
    assert start["kl"] == pytest.approx(0.0, abs=1e-5)
    # the tiny config trains with a large learning rate: every trained policy moved off the SFT model
    # (whose own KL is 0 to 1e-5, above). Not by a significant margin at this size: the standard error
    # is over only 8 held-out prefixes, and DPO at beta 1 barely moves in 4 steps.
    for (method, setting), steps in runs.items():
        if method != "sft":
            last = next(r for r in rows if (r["method"], r["setting"], r["step"]) == (method, setting, steps[-1]))
            assert last["kl"] > 5e-3 and last["kl_se"] > 0, (method, setting, last)
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").open()]
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    summary = json.loads((out / "runs.json").read_text())
    assert summary["pairs"] == len(pairs) and "val/accuracy" in summary["reward_model"]["val"]
    assert 0.6 <= summary["second_judge"]["test_accuracy"] <= 0.85

    # every run's held-out samples are saved, and judged.csv re-reads them: one row per point,
    # the same reward and KL as frontier.csv, the SFT model's own paired gain exactly 0
    samples = [json.loads(line) for line in (out / "samples" / "dpo-beta=1.jsonl").open()]
    assert len(samples) == 2 * 32 and {s["step"] for s in samples} == {2, 4}
    assert all(s["method"] == "dpo" and s["setting"] == "beta=1" and s["prompt"] for s in samples)
    # the reward path is wired: each sample's reward is the classifier's score of its prompt and
    # completion (the tiny model's completions are byte soup, so the scores differ by prompt; every
    # run is judged on the same 8 prefixes, which is why the runs' mean rewards come out alike)
    judge = SentimentClassifier(info["path"])
    scores = judge([s["prompt"] for s in samples], [s["completion"] for s in samples]).tolist()
    assert [s["reward"] for s in samples] == pytest.approx(scores, abs=1e-6)
    assert len({round(s["reward"], 6) for s in samples}) > 1
    with open(out / "judged.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == JUDGED_COLUMNS
        judged = {(r["method"], r["setting"], int(r["step"])): {k: float(r[k]) for k in JUDGED_COLUMNS[3:]}
                  for r in reader}  # fmt: skip
    assert judged.keys() == {(r["method"], r["setting"], r["step"]) for r in rows}
    for r in rows:
        j = judged[(r["method"], r["setting"], r["step"])]
        assert j["reward"] == pytest.approx(r["reward"]) and j["kl"] == pytest.approx(r["kl"])
        assert all(math.isfinite(v) for v in j.values()) and -1 <= j["vader"] <= 1
    assert judged[("sft", "", 0)]["reward_gain"] == 0 and judged[("sft", "", 0)]["vader_gain_se"] == 0
    assert judged[("dpo", "beta=1", 4)]["reward_gain"] == pytest.approx(
        judged[("dpo", "beta=1", 4)]["reward"] - judged[("sft", "", 0)]["reward"]
    )  # equal numbers of samples per prompt: the mean of paired differences is the difference of means

    # a second call finds every run done: nothing trains again, the same table comes out
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done before") == 7
    assert read_frontier_csv(out / "frontier.csv") == rows


def test_frontier_bad_setting_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dpo_lit", "frontier", "--config", "configs/frontier/tiny.yaml",
         "--out_dir", str(tmp_path), "--prefix_tokens", "[8, 2]"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == ["dpo-lit: error: prefix_tokens: expected 1 <= min <= max, got 8, 2"]
