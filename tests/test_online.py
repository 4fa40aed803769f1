"""The online family beside PPO (dpo_lit/rlhf/online.py, rloo.py, grpo.py, online_dpo.py) and the
judges: advantages and losses against hand-worked values, judges and win rates, and each method's
tiny config raising the held-out reward."""

import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from dpo_lit.cli import run
from dpo_lit.errors import ConfigError
from dpo_lit.judges import RewardJudge
from dpo_lit.pipelines.plots import read_scalars
from dpo_lit.rewards import LengthReward
from dpo_lit.rlhf.objectives import group_advantages, grpo_loss, k3_kl, reinforce_loss, rloo_advantages
from dpo_lit.sampling.measure import HeldoutSample, Measurement, win_rate

# ---- advantages and losses, by hand ------------------------------------------------------------------


def test_rloo_advantages_leave_each_sample_out_of_its_baseline():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])  # two prompts, k = 3, prompt-major
    # prompt 1: 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2; prompt 2: 0 - (0+6)/2 twice, 6 - 0
    torch.testing.assert_close(rloo_advantages(scores, 3), torch.tensor([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]))
    assert rloo_advantages(torch.tensor([4.0, 4.0]), 2).abs().max() == 0  # equal rewards: no signal
    with pytest.raises(ValueError, match="at least 2 samples"):
        rloo_advantages(scores, 1)


def test_group_advantages_centre_and_scale_within_each_prompt():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # prompt 1: mean 2, unbiased std 1; prompt 2: mean 2, centred (-2, -2, 4), unbiased std √12
    scaled = torch.tensor([-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4), *(x / (math.sqrt(12) + 1e-4) for x in (-2, -2, 4))])
    torch.testing.assert_close(group_advantages(scores, 3), scaled)
    torch.testing.assert_close(group_advantages(scores, 3, scale=False), torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]))
    assert group_advantages(torch.tensor([5.0, 5.0]), 2).abs().max() == 0  # a group that agrees: 0, not nan


def test_k3_kl_by_hand():
    # r = log π_ref - log π = -1: e^-1 + 1 - 1; r = 0: 0; r = 1: e - 1 - 1
    torch.testing.assert_close(
        k3_kl(torch.tensor([-1.0, -1.0, -2.0]), torch.tensor([-2.0, -1.0, -1.0])),
        torch.tensor([math.exp(-1), 0.0, math.e - 2]),
    )


def test_grpo_loss_by_hand():
    old = torch.zeros(2, 2)
    logps = torch.tensor([[math.log(1.5), 0.0], [0.0, 0.0]])  # ratio 1.5 on one token, else 1
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    a = torch.tensor([1.0, -2.0])
    # per token -min(ρA, clip(ρ)A): row 1 [-1.2 (clipped), -1]; row 2 [2, -]
    out = grpo_loss(logps, old, None, a, mask, clip_range=0.2, beta=0.0)
    assert out.loss.item() == pytest.approx(((-1.2 - 1.0) / 2 + 2.0) / 2)  # each rollout's mean, then the mean
    assert out.clipfrac.item() == pytest.approx(1 / 3)
    token = grpo_loss(logps, old, None, a, mask, clip_range=0.2, beta=0.0, normalization="token")
    assert token.loss.item() == pytest.approx((-1.2 - 1.0 + 2.0) / 3)
    constant = grpo_loss(logps, old, None, a, mask, clip_range=0.2, beta=0.0, normalization="constant", max_tokens=4)
    assert constant.loss.item() == pytest.approx((-1.2 - 1.0 + 2.0) / (2 * 4))  # Dr. GRPO: no length in it
    ref = torch.full((2, 2), -1.0)  # k3 per token: e^(ref - logp) - (ref - logp) - 1
    k3 = [[math.exp(-1 - math.log(1.5)) + 1 + math.log(1.5) - 1, math.exp(-1)], [math.exp(-1), 0.0]]
    with_kl = grpo_loss(logps, old, ref, a, mask, clip_range=0.2, beta=0.5)
    expected = ((-1.2 + 0.5 * k3[0][0] - 1.0 + 0.5 * k3[0][1]) / 2 + (2.0 + 0.5 * k3[1][0])) / 2
    assert with_kl.loss.item() == pytest.approx(expected)
    assert with_kl.kl.item() == pytest.approx((k3[0][0] + k3[0][1] + k3[1][0]) / 3)
    with pytest.raises(ValueError, match="needs the reference"):
        grpo_loss(logps, old, None, a, mask, clip_range=0.2, beta=0.1)


def test_reinforce_loss_by_hand():
    logps = torch.tensor([[-1.0, -2.0], [-3.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss = reinforce_loss(logps, torch.tensor([2.0, -1.0]), mask)
    assert loss.item() == pytest.approx(-(2.0 * -3.0 + -1.0 * -3.0) / 2)  # sums -3 and -3 (the pad is out)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.0, -1.0], [0.5, 0.0]]))  # -A_i / B on its tokens


# ---- judges and win rates --------------------------------------------------------------------------


def test_reward_judge_prefers_the_higher_score_and_ties_within_the_margin():
    judge = RewardJudge(LengthReward(target_words=4))
    verdicts = judge(["p", "p", "p"], ["one two three four", "a", "a b"], ["one", "one two three four", "c d"])
    torch.testing.assert_close(verdicts, torch.tensor([1.0, 0.0, 0.5]))
    loose = RewardJudge(LengthReward(target_words=4), tie_margin=10.0)
    assert loose(["p"], ["one two three four"], ["one"]).item() == 0.5
    with pytest.raises(ConfigError, match="tie_margin"):
        RewardJudge(LengthReward(), tie_margin=-1)


def _measurement(completions: list[str], prompts: list[int]) -> Measurement:
    samples = [HeldoutSample(0, p, "p", c, math.nan, math.nan, True) for c, p in zip(completions, prompts)]
    return Measurement(0, samples, raw=[])


def test_win_rate_is_over_prompts_with_ties_half():
    judge = RewardJudge(LengthReward(target_words=2))
    prompts = [0, 0, 1, 1]  # two samples of each of two prompts
    policy = _measurement(["a b", "a b", "a", "a b"], prompts)
    reference = _measurement(["a", "a b", "a b", "a b"], prompts)
    # verdicts 1, 0.5 (prompt 0: 0.75); 0, 0.5 (prompt 1: 0.25): mean 0.5, SE of (0.75, 0.25) = 0.25
    mean, se = win_rate(policy, reference, judge, ["x", "y"])
    assert mean == pytest.approx(0.5) and se == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same prompts"):
        win_rate(policy, _measurement(["a"] * 4, [0, 1, 0, 1]), judge, ["x", "y"])


# ---- each method's tiny config -----------------------------------------------------------------------


def _fit(config: str, tmp_path: Path, *overrides: str) -> dict[str, list[float]]:
    run(["fit", "--config", config, f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", *overrides])  # fmt: skip
    return {tag: [v for _, v in points] for tag, points in read_scalars(tmp_path / "lightning_logs" / "version_0").items()}


@pytest.mark.parametrize("method, logged", [
    ("rloo", ["reward", "kl", "loss", "advantage_abs", "response_length", "finished", "lr"]),
    ("grpo", ["reward", "kl", "loss", "clipfrac", "token_kl", "advantage_abs", "response_length"]),
    ("online_dpo", ["reward", "loss", "rewards/margins", "rewards/accuracies", "pairs", "score_gap"]),
])  # fmt: skip
def test_each_online_method_raises_the_held_out_reward(tmp_path, monkeypatch, method, logged):
    """The tiny config of each method on the length rule: the held-out reward (validation after each
    epoch, the same held-out prompts and seed) ends above where it started, and the training
    reward of the last fifth of the batches above the first fifth's, as PPO's tiny test asks."""
    monkeypatch.chdir(ROOT)
    scalars = _fit(f"configs/{method}/tiny.yaml", tmp_path)
    for name in logged:
        assert scalars[f"train/{name}"] and all(math.isfinite(v) for v in scalars[f"train/{name}"]), name
    reward = scalars["train/reward"]
    fifth = len(reward) // 5
    assert sum(reward[-fifth:]) / fifth > sum(reward[:fifth]) / fifth + 0.1
    assert scalars["val/reward"][-1] > scalars["val/reward"][0] + 0.05


def test_online_methods_refuse_settings_that_cannot_work(monkeypatch):
    from dpo_lit.losses import KTOLoss
    from dpo_lit.models import TINY_ALIAS
    from dpo_lit.rlhf import GRPOModule, OnlineDPOModule, RLOOModule

    with pytest.raises(ConfigError, match="RLOO baselines each rollout by the others"):
        RLOOModule(TINY_ALIAS, samples_per_prompt=1)
    with pytest.raises(ConfigError, match="GRPO normalises within each prompt's group"):
        GRPOModule(TINY_ALIAS, samples_per_prompt=1)
    with pytest.raises(ConfigError, match="model.kl_coef: must be >= 0"):
        GRPOModule(TINY_ALIAS, kl_coef=-0.1)
    with pytest.raises(ConfigError, match="online DPO samples a pair per prompt"):
        OnlineDPOModule(TINY_ALIAS, samples_per_prompt=4)
    with pytest.raises(ConfigError, match="online DPO trains on pairs"):
        OnlineDPOModule(TINY_ALIAS, loss=KTOLoss())


WIN_RATE = """
trainer:
  callbacks:
    - class_path: dpo_lit.callbacks.WinRate
      init_args:
        judge:
          class_path: dpo_lit.judges.RewardJudge
          init_args:
            reward:
              class_path: dpo_lit.rewards.LengthReward
              init_args:
                target_words: 8
        prompts_file: {prompts}
        num_prompts: 16
        num_samples: 2
        max_new_tokens: 24
"""


def test_win_rate_of_the_reference_against_itself_is_one_half(tmp_path, monkeypatch, caplog):
    """validate without a checkpoint: the policy is the reference, its samples (same seed) are the
    reference's, every verdict a tie."""
    monkeypatch.chdir(ROOT)
    (tmp_path / "win_rate.yaml").write_text(WIN_RATE.format(prompts=ROOT / "dpo_lit/assets/everyday_prompts_heldout.txt"))
    cli = run(["validate", "--config", "configs/dpo/tiny.yaml", "--config", str(tmp_path / "win_rate.yaml"),
               "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
               "--trainer.enable_progress_bar=false"])  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert metrics["val/win_rate"].item() == 0.5 and metrics["val/win_rate_stderr"].item() == 0.0
    assert "WinRate: the policy wins 0.500 ± 0.000 against the reference" in caplog.text


def test_online_dpo_wins_against_its_reference_by_the_judge_of_its_reward(tmp_path, monkeypatch):
    """Online DPO on the length rule, judged by the same rule on held-out prompts: the win rate
    against the starting policy ends above one half by more than two standard errors."""
    monkeypatch.chdir(ROOT)
    (tmp_path / "win_rate.yaml").write_text(WIN_RATE.format(prompts=ROOT / "dpo_lit/assets/everyday_prompts_heldout.txt"))
    scalars = _fit("configs/online_dpo/tiny.yaml", tmp_path, "--config", str(tmp_path / "win_rate.yaml"))
    rate, se = scalars["val/win_rate"][-1], scalars["val/win_rate_stderr"][-1]
    assert rate > 0.5 + 2 * se, (rate, se)


def test_compare_measures_every_method_at_the_same_budget_on_the_tiny_model(tmp_path, monkeypatch):
    """configs/compare/tiny.yaml end to end, each fit in its own process: a row per method (and the
    start model) with reward, paired gain, KL and win rate, each ± SE; every method sampled the budget
    (68 training prompts x 4); the online methods, which train on their own rollouts of the reward,
    beat the start model by the judge."""
    import json

    monkeypatch.chdir(ROOT)
    run(["compare", "--config", "configs/compare/tiny.yaml", f"--out_dir={tmp_path}"])
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["reference", "dpo", "ipo", "kto", "online_dpo", "ppo", "rloo", "grpo"]
    assert report["budget"] == 272 and (tmp_path / "report.png").stat().st_size > 10_000
    keys = ("reward", "reward_se", "paired_gain", "paired_gain_se", "kl", "kl_se", "win_rate", "win_rate_se", "seconds")
    for name, row in rows.items():
        assert all(math.isfinite(row[k]) for k in keys), name
        if name != "reference":
            assert 272 <= row["completions"] < 272 + 32, name  # the budget, passed by less than one batch
    for name in ("online_dpo", "ppo", "rloo", "grpo"):
        assert rows[name]["win_rate"] > 0.5 + 2 * rows[name]["win_rate_se"], name
    assert [s["method"] for s in report["summary"]] == list(rows)
