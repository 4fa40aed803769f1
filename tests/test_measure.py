"""One held-out measurement (dpo_lit/sampling/measure.py): the KL estimate and the rewards of the same
samples, the paired gain, and how a module's reference is found."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from dpo_lit.data.prompts import encode_prompts
from dpo_lit.models import TINY_ALIAS, load_model
from dpo_lit.reference import NoReference
from dpo_lit.rewards import LengthReward
from dpo_lit.sampling.kl import estimate_kl
from dpo_lit.sampling.measure import (
    HeldoutSample,
    Measurement,
    MeasureSpec,
    measure,
    paired_gain,
    reference_model,
)

PROMPTS = ["Hi there.", "Tell me a story.", "What is a cat?"]


@pytest.fixture(scope="module")
def models():
    policy = load_model(TINY_ALIAS).eval()
    reference = load_model(TINY_ALIAS).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a different model: the KL is not zero
    return policy, reference


def test_measure_is_the_kl_estimate_and_the_reward_of_the_same_samples(models, tiny_tokenizer):
    policy, reference = models
    ids = encode_prompts(tiny_tokenizer, PROMPTS)
    spec = MeasureSpec(num_samples=3, max_new_tokens=8, batch_size=4, seed=7)
    result = measure(policy, tiny_tokenizer, PROMPTS, ids, spec, LengthReward(4), reference)
    kl = estimate_kl(policy, reference, tiny_tokenizer, ids, 3, 8, batch_size=4, seed=7)
    assert result.kl.per_sample == pytest.approx(kl.per_sample, abs=1e-6) and result.kl.mean > 0.01
    assert [s.log_ratio for s in result.samples] == result.kl.per_sample
    whole = [PROMPTS[s.prompt_index] for s in result.samples]
    scores = LengthReward(4)(whole, [s.completion for s in result.samples], [s.finished for s in result.samples])
    assert [s.reward for s in result.samples] == scores.tolist()
    assert [s.prompt_index for s in result.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    per_prompt = scores.view(3, 3).double().mean(-1)
    assert result.reward == pytest.approx(float(per_prompt.mean())) and result.reward_se == pytest.approx(
        float(per_prompt.std()) / 3**0.5
    )
    # without a reference: rewards only; the same samples again from the recorded ones
    again = measure(policy, tiny_tokenizer, PROMPTS, ids, spec, LengthReward(4), samples=result.raw)
    assert again.kl is None and [s.reward for s in again.samples] == [s.reward for s in result.samples]


def scored(rewards: list[float], prompts: list[int]) -> Measurement:
    samples = [HeldoutSample(0, p, f"p{p}", "", r, 0.0, True) for r, p in zip(rewards, prompts)]
    return Measurement(0, samples, [])


def test_paired_gain_is_the_mean_over_prompts_of_the_differences():
    prompts = [0, 0, 1, 1, 2, 2]
    policy = scored([1.0, 3.0, 2.0, 2.0, 5.0, 7.0], prompts)
    reference = scored([0.0, 2.0, 2.0, 2.0, 1.0, 1.0], prompts)
    gain, se = paired_gain(policy, reference)
    per_prompt = torch.tensor([1.0, 0.0, 5.0], dtype=torch.float64)
    assert gain == pytest.approx(2.0) and se == pytest.approx(float(per_prompt.std()) / 3**0.5)
    with pytest.raises(ValueError, match="same prompts"):
        paired_gain(policy, scored([0.0] * 6, [0, 1, 0, 1, 2, 2]))


def test_a_modules_reference_is_its_model_else_the_lora_policy_with_its_adapter_off(models):
    policy, reference = models
    copy = SimpleNamespace(model=lambda p: (reference, contextlib.nullcontext))
    assert reference_model(SimpleNamespace(reference=copy, policy=policy))[0] is reference
    assert reference_model(SimpleNamespace(reference=NoReference(), policy=policy)) is None  # full weights, none

    class LoRAPolicy(torch.nn.Module):
        def disable_adapter(self):
            return contextlib.nullcontext()

    lora = LoRAPolicy()
    found = reference_model(SimpleNamespace(reference=NoReference(), policy=lora))
    assert found[0] is lora and found[1] == lora.disable_adapter


def test_at_a_temperature_the_kl_is_between_the_two_tempered_models(models, tiny_tokenizer):
    """PPO's held-out KL: rollouts at T are drawn from softmax(logits / T); both models are scored at
    T token by token (the samples' own logp is the untempered model's), as PPO's training KL is."""
    from dpo_lit.data.collate import pad_rows
    from dpo_lit.rlhf.ppo import token_outputs

    policy, reference = models
    ids = encode_prompts(tiny_tokenizer, PROMPTS)
    spec = MeasureSpec(num_samples=2, max_new_tokens=6, batch_size=4, seed=3, temperature=0.7)
    result = measure(policy, tiny_tokenizer, PROMPTS, ids, spec, reference=reference)
    rows, mask, completion = pad_rows(
        [s.prompt_ids + s.completion_ids for s in result.raw], tiny_tokenizer.pad_token_id,
        first_scored=[len(s.prompt_ids) for s in result.raw],
    )  # fmt: skip
    width = max(len(s.completion_ids) for s in result.raw)
    with torch.no_grad():
        ours = token_outputs(policy, rows, mask, completion, width, temperature=0.7).logps.sum(-1)
        theirs = token_outputs(reference, rows, mask, completion, width, temperature=0.7).logps.sum(-1)
    assert result.kl.per_sample == pytest.approx((ours - theirs).tolist(), abs=1e-5)
    again = measure(policy, tiny_tokenizer, PROMPTS, ids, spec, reference=reference, samples=result.raw)
    assert again.kl.per_sample == result.kl.per_sample  # recorded samples are scored the same way
