"""Completion log-probs against a plain full-vocabulary log-softmax."""

import pytest
import torch

from dpo_lit.logps import _SelectiveLogSoftmax, completion_logps, selective_log_softmax


@pytest.fixture(scope="module")
def tiny_model():
    from dpo_lit.models import TINY_ALIAS, load_model

    return load_model(TINY_ALIAS)


def naive_logps(model, input_ids, attention_mask, completion_mask):
    logp = model(input_ids=input_ids, attention_mask=attention_mask).logits.float().log_softmax(-1)  # (N, T, V)
    picked = logp[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (N, T-1)
    return (picked * completion_mask[:, 1:]).sum(-1), completion_mask[:, 1:].sum(-1).float()


def make_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 16), generator=g)
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 6:] = True
    attention[1, 11:] = 0  # a right-padded row
    completion[1, 11:] = False
    completion[3, :9] = False  # a longer prompt
    return ids, attention, completion


def test_completion_logps_match_full_log_softmax(tiny_model):
    ids, attention, completion = make_batch(tiny_model.config.vocab_size)
    logps, tokens = completion_logps(tiny_model, ids, attention, completion, chunk=5)
    expected, expected_tokens = naive_logps(tiny_model, ids, attention, completion)
    torch.testing.assert_close(logps, expected)
    torch.testing.assert_close(tokens, torch.tensor([10.0, 5.0, 10.0, 7.0]))
    torch.testing.assert_close(tokens, expected_tokens)


def test_gradients_match_full_log_softmax(tiny_model):
    ids, attention, completion = make_batch(tiny_model.config.vocab_size, seed=1)
    logps, _ = completion_logps(tiny_model, ids, attention, completion, chunk=3)
    grads = torch.autograd.grad(logps.sum(), list(tiny_model.parameters()))
    expected, _ = naive_logps(tiny_model, ids, attention, completion)
    expected_grads = torch.autograd.grad(expected.sum(), list(tiny_model.parameters()))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_selective_log_softmax_gradcheck_and_values():
    logits = torch.randn(9, 13, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (9,))
    assert torch.autograd.gradcheck(lambda x: _SelectiveLogSoftmax.apply(x, targets, 4), (logits,))
    expected = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, targets, chunk=2), expected)


def test_bf16_logits_are_normalised_in_float32():
    logits = (torch.randn(6, 50) * 5).to(torch.bfloat16)
    targets = torch.randint(0, 50, (6,))
    out = selective_log_softmax(logits, targets)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1))
