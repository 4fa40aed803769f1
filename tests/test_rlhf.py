"""The RLHF baseline: PPO's arithmetic against values worked out by hand, the reward model and PPO
trained through the CLI on the tiny model."""

import copy
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from lightning import Callback

from dpo_lit.cli import run
from dpo_lit.pipelines.plots import read_scalars
from dpo_lit.rlhf import KLController, gae
from dpo_lit.rlhf.objectives import policy_loss, token_rewards, value_loss, whiten


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 3.0, 99.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [0.2, 0.4, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ends after two tokens
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 1: δ2 = 2 - .6 = 1.4; δ1 = 0 + .9·.6 - .4 = .14; δ0 = 1 + .9·.4 - .2 = 1.16; A_t = δ_t + .45·A_{t+1}
    # row 2: δ1 = 3 - .4 = 2.6 (nothing after the last token); δ0 = 1 + .9·.4 - .2 = 1.16
    expected = torch.tensor([[1.16 + 0.45 * 0.77, 0.14 + 0.45 * 1.4, 1.4], [1.16 + 0.45 * 2.6, 2.6, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)


def test_gae_with_lambda_one_gives_returns_to_go():
    rewards, values, mask = torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), torch.ones(1, 3)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.ones(1, 3))
    torch.testing.assert_close(advantages, torch.full((1, 3), 0.5))


def test_clipped_policy_loss_by_hand():
    ratio = torch.tensor([[1.5, 0.5, 1.0]])
    old = torch.zeros(1, 3)
    out = policy_loss(ratio.log(), old, torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3), clip_range=0.2)
    # -A·ρ = [-1.5, -0.5, 1.0]; -A·clip(ρ) = [-1.2, -0.8, 1.0]; the max: [-1.2, -0.5, 1.0]
    assert out.loss.item() == pytest.approx(-0.7 / 3)
    assert out.clipfrac.item() == pytest.approx(1 / 3)
    assert out.approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)


def test_clipped_value_loss_by_hand():
    loss = value_loss(
        torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), clip_range=0.2
    )
    # clipped values [0.2, 0]: max((V-R)², (Vc-R)²) = [max(0, .64), max(1, 1)]
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.0) / 2)


def test_token_rewards_put_the_score_on_the_last_token():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logps, ref = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]]), torch.full((2, 3), -1.5)
    rewards = token_rewards(torch.tensor([3.0, 5.0]), logps, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.05, 2.95], [5.05, 0.0, 0.0]]))


def test_whiten_uses_only_masked_entries():
    values, mask = torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(whiten(values, mask), torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_kl_controller():
    fixed = KLController(0.1)
    fixed.update(kl=50.0, n=64)
    assert fixed.coef == 0.1
    adaptive = KLController(0.1, target=6.0, horizon=100)
    adaptive.update(kl=12.0, n=10)  # error clipped to +0.2
    assert adaptive.coef == pytest.approx(0.1 * 1.02)
    adaptive.update(kl=6.0 * 0.95, n=10)  # error -0.05
    assert adaptive.coef == pytest.approx(0.1 * 1.02 * (1 - 0.005))


def _fit(config: str, tmp_path: Path, *overrides: str) -> tuple[Path, dict]:
    run(["fit", "--config", config, f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", *overrides])  # fmt: skip
    run_dir = tmp_path / "lightning_logs" / "version_0"
    return run_dir, {tag: [v for _, v in points] for tag, points in read_scalars(run_dir).items()}


def test_reward_model_learns_the_tiny_pairs_and_scores_as_a_reward(tmp_path, monkeypatch):
    from dpo_lit.data.io import read_records
    from dpo_lit.rewards import RewardModel

    monkeypatch.chdir(ROOT)
    run_dir, scalars = _fit("configs/reward/tiny.yaml", tmp_path)
    assert scalars["val/accuracy"][-1] >= 0.9 and scalars["val/margin"][-1] > 0
    assert scalars["val/loss"][-1] < scalars["val/loss"][0]
    records = [r for r, _ in read_records("dpo_lit/assets/tiny_pairs_val.jsonl")]
    reward = RewardModel(str(run_dir / "reward_model"))
    prompts = [r["prompt"] for r in records]
    chosen = reward(prompts, [r["chosen"] for r in records], [True] * len(records))
    rejected = reward(prompts, [r["rejected"] for r in records], [True] * len(records))
    assert (chosen > rejected).float().mean() >= 0.9


def test_ppo_raises_the_rule_reward_and_logs_every_metric(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    _, scalars = _fit("configs/ppo/tiny.yaml", tmp_path)
    names = ["reward", "kl", "kl_coef", "policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy",
             "response_length"]  # fmt: skip
    for name in names:
        values = scalars[f"train/{name}"]
        assert values and all(math.isfinite(v) for v in values), name
    reward = scalars["train/reward"]
    fifth = len(reward) // 5
    assert sum(reward[-fifth:]) / fifth > sum(reward[:fifth]) / fifth + 0.1
    assert scalars["val/reward"][-1] > scalars["val/reward"][0]


def test_ppo_at_zero_learning_rate_changes_nothing(tmp_path, monkeypatch):
    from dpo_lit.cli import build_cli

    monkeypatch.chdir(ROOT)
    cli = build_cli("fit", ["configs/ppo/tiny.yaml"], {
        "model.init_args.optimizer.init_args.lr": 0.0, "trainer.max_steps": 8, "trainer.limit_val_batches": 0,
        "trainer.default_root_dir": str(tmp_path), "trainer.enable_progress_bar": False, "export.enabled": False,
    })  # fmt: skip
    before = {k: v.clone() for k, v in cli.model.policy.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.model.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    frozen = cli.model.reference.frozen.state_dict()  # the frozen copy: never trained
    assert all(torch.equal(before[k], frozen[k]) for k in before)
    assert cli.trainer.callback_metrics["train/kl"].item() == 0.0


def test_monitoring_callbacks_work_on_ppo_unchanged(tmp_path, monkeypatch):
    from dpo_lit.cli import build_cli

    monkeypatch.chdir(ROOT)
    callbacks = [
        {"class_path": "dpo_lit.callbacks.kl.SampledKL", "init_args": {"num_prompts": 4, "num_samples": 2,
                                                                        "max_new_tokens": 8}},
        {"class_path": "dpo_lit.callbacks.samples.SampleTable", "init_args": {"max_new_tokens": 8}},
        {"class_path": "dpo_lit.callbacks.capability.CapabilityEval",
         "init_args": {"tasks": ["wikitext", "arc_easy"], "perplexity_tokens": 256, "limit": 8}},
    ]  # fmt: skip
    cli = build_cli("fit", ["configs/ppo/tiny.yaml"], {
        "trainer.callbacks": callbacks, "trainer.max_epochs": 1, "trainer.limit_train_batches": 2,
        "trainer.limit_val_batches": 1, "trainer.default_root_dir": str(tmp_path),
        "trainer.enable_progress_bar": False, "export.enabled": False,
    })  # fmt: skip
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert {"val/kl", "val/reward"} <= set(metrics)
    for task in ("wikitext", "arc_easy"):
        assert any(k.startswith(f"cap/{task}/") and k.endswith("_delta") for k in metrics), task
    assert metrics["val/kl"].item() > 0  # two batches of updates moved the policy


def test_lora_reward_model_export_scores_as_in_training(tmp_path, monkeypatch):
    """The merged LoRA export keeps the trained head: RewardModel reproduces the module's rewards."""
    from dpo_lit.data.collate import pad_rows
    from dpo_lit.data.prompts import encode_prompts
    from dpo_lit.rewards import RewardModel
    from dpo_lit.rlhf.reward_model import sequence_rewards

    monkeypatch.chdir(ROOT)
    cli = run(["fit", "--config", "configs/reward/tiny.yaml", "--model.lora.r=8", "--model.lora.alpha=16",
               "--export.merge=true", "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path}",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])  # fmt: skip
    module = cli.model
    prompts, completions = ["Hello, how are you?", "Can you help me?"], ["Very well, thank you!", "No."]
    reward = RewardModel(str(tmp_path / "lightning_logs" / "version_0" / "merged"))
    tokenizer = module.tokenizer
    rows = [p + tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for p, c in zip(encode_prompts(tokenizer, prompts), completions)]  # fmt: skip
    ids, mask, _ = pad_rows(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        expected = sequence_rewards(module.reward_model.eval(), ids, mask)
    torch.testing.assert_close(reward(prompts, completions, [True, True]), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, torch.zeros(2))
    # the adapter export names its base as the run did (portable, not this machine's cache folder) and scores alike
    adapter = tmp_path / "lightning_logs" / "version_0" / "reward_model"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-random-llama"
    torch.testing.assert_close(RewardModel(str(adapter))(prompts, completions, [True, True]), expected, atol=1e-4, rtol=1e-4)


class UpdateRecorder(Callback):
    """What a PPO run did, read from outside: the LR of every optimizer update (just before it is
    applied); at each batch's start a copy of the policy, the batch and ``global_step``; at its end
    the ``train/`` metrics."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.starts: list[tuple[torch.nn.Module, dict, int]] = []
        self.metrics: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append((copy.deepcopy(pl_module.policy).eval(), batch, trainer.global_step))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append({k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def _fit_ppo(tmp_path, overrides: dict) -> tuple:
    """configs/ppo/tiny.yaml (8 prompts x 4 rollouts a batch, minibatches of 16, 2 PPO epochs: 4
    updates a batch) fitted with ``overrides``, no validation; the CLI and an UpdateRecorder."""
    from dpo_lit.cli import build_cli

    cli = build_cli("fit", ["configs/ppo/tiny.yaml"], {
        "trainer.limit_val_batches": 0, "trainer.default_root_dir": str(tmp_path), "trainer.enable_progress_bar": False,
        "export.enabled": False, **overrides,
    })  # fmt: skip
    recorder = UpdateRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, recorder


@pytest.mark.parametrize("length", [
    {"trainer.max_steps": 8},
    {"trainer.max_steps": 6},  # reached after the 2nd batch's 2nd update: the batch still runs all 4
    {"trainer.max_epochs": 1, "trainer.limit_train_batches": 2},  # Lightning's estimate: 2 (batches)
], ids=["max_steps", "max_steps_mid_batch", "max_epochs"])  # fmt: skip
def test_ppo_linear_schedule_reaches_zero_lr_at_the_last_update(tmp_path, monkeypatch, length):
    """The schedule is sized in the updates the run makes (8: two batches of 4) and steps once per
    update, however the trainer's length is given: update k runs at 3e-3 · (8 - k) / 8 and the LR
    is 0 after the last. Stepped once per batch of prompts and sized in max_steps it stopped at
    3e-3 · 6/8 = 0.00225; sized in Lightning's estimate (batches, or max_steps) it reached 0 early."""
    monkeypatch.chdir(ROOT)
    cli, recorder = _fit_ppo(tmp_path, {"model.init_args.scheduler": "linear", **length})
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert cli.trainer.global_step == len(recorder.lrs) == scheduler.last_epoch == 8
    assert recorder.lrs == pytest.approx([3e-3 * (8 - k) / 8 for k in range(8)], rel=1e-6)
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 0.0


def test_ppo_planned_updates_count_the_last_batch_and_a_smaller_one():
    from dpo_lit.rlhf.schedule import planned_updates, updates_per_batch

    # configs/ppo/smollm2_everyday_vader.yaml: 68 prompts in batches of 8 (the 9th has 4), 2 rollouts
    # each, minibatches of 8, 2 PPO epochs: 4 updates a batch, 2 for the small one, 34 an epoch.
    sizes = [8] * 8 + [4]
    updates = partial(updates_per_batch, samples_per_prompt=2, minibatch_size=8, ppo_epochs=2)
    assert planned_updates(sizes, updates, max_epochs=-1, max_steps=48) == 50  # 13 batches: 34 + 4 · 4
    assert planned_updates(sizes, updates, max_epochs=-1, max_steps=34) == 34
    assert planned_updates(sizes, updates, max_epochs=2, max_steps=-1) == 68
    assert planned_updates(sizes, updates, max_epochs=1, max_steps=100) == 34
    assert planned_updates(sizes, updates, max_epochs=-1, max_steps=-1) is None


def test_ppo_token_outputs_at_temperature_are_log_softmax_of_tempered_logits():
    """token_outputs at T equals log_softmax of the model's own logits / T at each response token,
    and its entropy is that distribution's."""
    from dpo_lit.data.collate import pad_rows
    from dpo_lit.models import TINY_ALIAS, load_model
    from dpo_lit.rlhf.ppo import token_outputs

    model = load_model(TINY_ALIAS).eval()
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]]
    ids, mask, completion = pad_rows(rows, 0, first_scored=[2, 3])
    with torch.no_grad():
        out = token_outputs(model, ids, mask, completion, width=4, entropy=True, temperature=0.5)
        logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float() / 0.5, -1)  # (B, T, V)
    for b, (row, first) in enumerate(zip(rows, [2, 3])):
        want = torch.stack([logps[b, t - 1, row[t]] for t in range(first, len(row))])
        torch.testing.assert_close(out.logps[b, : len(want)], want, rtol=0, atol=1e-5)
        p = logps[b, first - 1].exp()
        torch.testing.assert_close(out.entropy[b, 0], -(p * logps[b, first - 1]).sum(), rtol=0, atol=1e-4)


def _tempered_kl_and_entropy(policy, reference, samples, temperature: float) -> tuple[float, float]:
    """Mean over ``samples`` of sum_t [log π_T(y_t) - log π_ref,T(y_t)], and the mean entropy of π_T
    over their response tokens, each row alone (no padding): π_T = softmax(logits / T)."""
    kls, entropies = [], []
    with torch.no_grad():
        for s in samples:
            ids, first = torch.tensor([s.prompt_ids + s.completion_ids]), len(s.prompt_ids)
            targets = ids[0, first:]  # (N,)
            tempered = [torch.log_softmax(m(input_ids=ids).logits[0, first - 1 : -1].float() / temperature, -1)
                        for m in (policy, reference)]  # fmt: skip  # (N, V) each
            logp, ref = (t.gather(-1, targets[:, None]).squeeze(-1) for t in tempered)
            kls.append((logp - ref).sum())
            entropies.append(-(tempered[0].exp() * tempered[0]).sum(-1))
    return torch.stack(kls).mean().item(), torch.cat(entropies).mean().item()


def test_ppo_temperature_tempers_old_new_and_reference_logps_alike(tmp_path, monkeypatch):
    """At T = 0.5 the rollouts come from softmax(logits / T), and PPO takes every log-prob there:
    the 2nd batch's train/kl (policy moved by 4 updates) is the KL between the tempered policy and
    the tempered reference on its rollouts, worked out apart here (drawn again with the same seed
    from a copy of the policy at that batch's start), and train/entropy the tempered entropy. At
    step 0 (policy == reference) the KL is 0, and at lr 0 every ratio is 1: no clipping, approx_kl 0."""
    from dpo_lit.sampling.sample import sample

    monkeypatch.chdir(ROOT)
    temperature = 0.5
    cli, recorder = _fit_ppo(tmp_path, {"model.init_args.temperature": temperature, "trainer.max_steps": 8})
    h, reference = cli.model.hparams, cli.model.reference.frozen
    assert recorder.metrics[0]["train/kl"] == 0.0
    policy, batch, step = recorder.starts[1]
    samples = sample(
        policy, cli.model.tokenizer, batch["prompt_ids"], h.samples_per_prompt, h.max_new_tokens,
        temperature=temperature, batch_size=h.generation_batch_size, seed=h.seed + step,
    )
    kl, entropy = _tempered_kl_and_entropy(policy, reference, samples, temperature)
    untempered_kl, _ = _tempered_kl_and_entropy(policy, reference, samples, 1.0)
    assert abs(kl - untempered_kl) > 0.01  # the check below tells the two apart
    assert recorder.metrics[1]["train/kl"] == pytest.approx(kl, abs=1e-4)
    assert recorder.metrics[1]["train/entropy"] == pytest.approx(entropy, abs=1e-4)

    cli, recorder = _fit_ppo(tmp_path / "lr0", {
        "model.init_args.temperature": temperature, "model.init_args.optimizer.init_args.lr": 0.0,
        "trainer.max_steps": 4,
    })  # fmt: skip
    assert recorder.metrics[0]["train/kl"] == 0.0
    assert recorder.metrics[0]["train/approx_kl"] == pytest.approx(0.0, abs=1e-6)  # ratio 1 at every token
    assert recorder.metrics[0]["train/clipfrac"] == 0.0


def test_ppo_temperature_logps_are_those_of_the_distribution_generate_samples_from():
    """At T = 0.5 the log-prob token_outputs gives each sampled token is log_softmax of generate's
    own scores at that step (the logits after its temperature warper: what it drew from), and not
    the untempered model's."""
    from dpo_lit.data.collate import pad_rows
    from dpo_lit.models import TINY_ALIAS, load_model, load_tokenizer
    from dpo_lit.rlhf.ppo import token_outputs
    from dpo_lit.sampling.sample import generate_kwargs

    model, tokenizer = load_model(TINY_ALIAS).eval(), load_tokenizer(TINY_ALIAS)
    prompt = torch.tensor([[5, 6, 7, 8]])  # (1, P)
    kwargs = generate_kwargs(8, 0.5, 1.0, 0, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), output_scores=True, **kwargs)
    drawn = out.sequences[0, prompt.shape[1] :]  # (N,) one row: no padding after an EOS
    sampler = torch.stack([torch.log_softmax(s[0].float(), -1)[t] for s, t in zip(out.scores, drawn)])  # (N,)
    ids, mask, completion = pad_rows([out.sequences[0].tolist()], 0, first_scored=[prompt.shape[1]])
    with torch.no_grad():
        tempered, plain = (token_outputs(model, ids, mask, completion, len(drawn), temperature=t).logps[0] for t in (0.5, 1.0))
    torch.testing.assert_close(tempered, sampler, rtol=0, atol=1e-4)
    assert (plain - sampler).abs().max() > 0.1  # the untempered log-probs are another distribution's


def test_ppo_temperature_val_kl_rollouts_is_the_tempered_kl(tmp_path, monkeypatch):
    """After 4 updates at T = 0.5, val/kl_rollouts on the first held-out batch is the KL between the
    tempered policy and the tempered reference on that batch's rollouts (drawn again here with
    validation's seed), as train/kl is; it was the untempered log-ratio, which is no KL at T != 1."""
    from dpo_lit.sampling.sample import sample

    monkeypatch.chdir(ROOT)
    temperature = 0.5
    cli, _ = _fit_ppo(tmp_path, {"model.init_args.temperature": temperature, "trainer.max_steps": 4})
    cli.trainer.limit_val_batches = 1
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    h, policy, reference = cli.model.hparams, cli.model.policy, cli.model.reference.frozen
    batch = next(iter(cli.datamodule.val_dataloader()))
    samples = sample(
        policy, cli.model.tokenizer, batch["prompt_ids"], h.samples_per_prompt, h.max_new_tokens,
        temperature=temperature, batch_size=h.generation_batch_size, seed=h.seed + 10_000,
    )
    kl, _ = _tempered_kl_and_entropy(policy, reference, samples, temperature)
    untempered_kl, _ = _tempered_kl_and_entropy(policy, reference, samples, 1.0)
    assert abs(kl - untempered_kl) > 0.01  # the check below tells the two apart
    assert metrics["val/kl_rollouts"] == pytest.approx(kl, abs=1e-4)
