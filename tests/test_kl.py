"""The sampled KL is zero against itself and agrees with an exact enumeration on a 6-token model."""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from dpo_lit.callbacks.reward_kl import HeldoutSample, summarize_samples
from dpo_lit.sampling.kl import estimate_kl, kl_from_samples, mean_se, sequence_logps, summarize
from dpo_lit.sampling.sample import Sample, sample

VOCAB, EOS, MAX_NEW = 6, 0, 3
PROMPTS = [[3, 4], [5, 1, 2, 4]]  # different lengths: the short one is left-padded when sampling


def six_token_model(seed: int) -> PreTrainedModel:
    """One layer of width 16 over 6 token ids, initialised wide enough to give peaked, distinct
    next-token distributions (a KL of a few tenths of a nat between two seeds)."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        initializer_range=0.5,
        tie_word_embeddings=False,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def policy() -> PreTrainedModel:
    return six_token_model(0)


@pytest.fixture(scope="module")
def reference() -> PreTrainedModel:
    return six_token_model(1)


def all_completions() -> list[list[int]]:
    """Every completion of truncated sampling: an EOS within 3 tokens, or 3 tokens without one."""
    words = range(1, VOCAB)
    out: list[list[int]] = []
    for n in range(MAX_NEW):
        out += [[*w, EOS] for w in itertools.product(words, repeat=n)]
    return out + [list(w) for w in itertools.product(words, repeat=MAX_NEW)]


def exact_kl(policy: PreTrainedModel, reference: PreTrainedModel, prompt: list[int]) -> tuple[float, float]:
    """Σ_y p(y) log(p(y)/q(y)) over every completion, and Σ_y p(y)."""
    rows = [Sample(0, prompt, c, c[-1] == EOS, 0.0, "") for c in all_completions()]
    p = torch.tensor(sequence_logps(policy, rows, batch_size=len(rows)), dtype=torch.float64)
    q = torch.tensor(sequence_logps(reference, rows, batch_size=len(rows)), dtype=torch.float64)
    return float((p.exp() * (p - q)).sum()), float(p.exp().sum())


def test_sampled_kl_matches_the_exact_enumeration(
    policy: PreTrainedModel, reference: PreTrainedModel
) -> None:
    exact = []
    for prompt in PROMPTS:
        kl, total = exact_kl(policy, reference, prompt)
        assert total == pytest.approx(1.0, abs=1e-5)
        exact.append(kl)
    expected = sum(exact) / len(exact)  # the same number of samples per prompt
    estimate = estimate_kl(
        policy, reference, None, PROMPTS, num_samples=1500, max_new_tokens=MAX_NEW, batch_size=1000,
        eos_token_id=EOS, pad_token_id=EOS,
    )  # fmt: skip
    assert estimate.n == 3000
    assert 0.05 < expected  # the two models differ: the test can fail
    # The Monte-Carlo error of these two prompts' KL: within each prompt's 1500 samples. (The
    # estimate's own stderr is over prompts, the error for the population the prompts stand for.)
    per_prompt = torch.tensor(estimate.per_sample, dtype=torch.float64).view(len(PROMPTS), -1)  # (P, k)
    mc_se = float(per_prompt.var(-1).div(per_prompt.shape[1]).sum().sqrt()) / len(PROMPTS)
    assert abs(estimate.mean - expected) < 4 * mc_se, (estimate.mean, mc_se, expected)
    assert mc_se < 0.2 * expected
    assert 0 < estimate.finished_fraction < 1


def test_kl_against_itself_is_zero_per_sample(policy: PreTrainedModel) -> None:
    estimate = estimate_kl(
        policy, policy, None, PROMPTS, num_samples=8, max_new_tokens=MAX_NEW, eos_token_id=EOS, seed=1
    )
    assert max(abs(v) for v in estimate.per_sample) < 1e-5  # generate's raw logits vs one forward
    assert estimate.mean == pytest.approx(0.0, abs=1e-6)


def test_reference_context_is_entered_around_the_reference_forward(policy: PreTrainedModel) -> None:
    entered = []

    @contextlib.contextmanager
    def swap_to_reference():
        entered.append(True)
        saved = policy.lm_head.weight.detach().clone()
        policy.lm_head.weight.data.mul_(0.0)  # a uniform reference: log q = -log 6 per token
        try:
            yield
        finally:
            policy.lm_head.weight.data.copy_(saved)

    estimate = estimate_kl(
        policy, policy, None, PROMPTS[:1], num_samples=4, max_new_tokens=MAX_NEW, eos_token_id=EOS,
        reference_context=swap_to_reference,
    )  # fmt: skip
    assert entered == [True]
    samples = [Sample(0, PROMPTS[0], [1, 2, EOS], True, -1.0, "")]
    assert kl_from_samples(samples, policy, reference_context=swap_to_reference).per_sample == [
        pytest.approx(-1.0 + 3 * math.log(VOCAB), abs=1e-5)
    ]
    assert estimate.n == 4


def test_summary_mean_and_standard_error() -> None:
    estimate = summarize([1.0, 2.0, 3.0, 6.0], [True, False, True, True])
    assert estimate.mean == 3.0
    assert estimate.stderr == pytest.approx(math.sqrt(14 / 3) / 2)  # sample std / √n
    assert estimate.finished_fraction == 0.75
    assert math.isnan(summarize([1.0], [False]).stderr)


def test_standard_errors_are_over_prompts_when_samples_share_a_prompt() -> None:
    """4 samples of each of 3 prompts that agree within their prompt (as samples of one prompt tend
    to): the error of the mean is that of 3 prompt means, std([1, 2, 6]) / √3 = 1.528, not the
    std / √12 = 0.651 of 12 independent draws. The KL summary and the held-out reward/KL points
    report the same."""
    values, prompts = [1.0] * 4 + [2.0] * 4 + [6.0] * 4, [0] * 4 + [1] * 4 + [2] * 4
    expected = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2) / math.sqrt(3)
    samples = [HeldoutSample(0, p, "prompt", "completion", v, 2 * v, True) for v, p in zip(values, prompts)]
    point = summarize_samples(samples)
    assert (point.reward, point.reward_se) == pytest.approx((3.0, expected))
    assert (point.kl, point.kl_se) == pytest.approx((6.0, 2 * expected))
    assert mean_se(values, prompts) == pytest.approx((3.0, expected))
    assert summarize(values, [True] * 12, prompts).stderr == pytest.approx(expected)


def test_kl_from_samples_takes_its_standard_error_over_prompts(policy, reference) -> None:
    """Three samples of each of three prompts: the estimate's error is over the 3 prompt means."""
    samples = sample(policy, None, [[1], [2], [3]], 3, MAX_NEW, seed=0, eos_token_id=EOS, pad_token_id=0)
    estimate = kl_from_samples(samples, reference)
    per_prompt = torch.tensor(estimate.per_sample, dtype=torch.float64).view(3, 3).mean(-1)  # (P,)
    assert estimate.stderr == pytest.approx(float(per_prompt.std() / math.sqrt(3)))
