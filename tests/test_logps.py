"""Completion log-probs against a plain full-vocabulary log-softmax."""

import warnings

import pytest
import torch
from conftest import make_batch

import dpo_lit.logps
from dpo_lit.logps import _SelectiveLogSoftmax, completion_logps, selective_log_softmax


@pytest.fixture(scope="module")
def tiny_model():
    from dpo_lit.models import TINY_ALIAS, load_model

    return load_model(TINY_ALIAS)


def naive_logps(model, input_ids, attention_mask, completion_mask):
    logp = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float().log_softmax(-1)  # (N, T, V)
    picked = logp[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (N, T-1)
    return (picked * completion_mask[:, 1:]).sum(-1), completion_mask[:, 1:].sum(-1).float()




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


# Families whose forward scales, soft-caps or cuts the head's logits (transformers' modeling code),
# as tiny random models: 2 layers, width 32, a 97-token vocabulary, scales far from 1 so that a
# missed one moves every log-prob.
SMALL = dict(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
HYBRID = dict(mamba_n_heads=4, mamba_d_head=16)
SCALED_FAMILIES = {
    "granite": dict(logits_scaling=3.0),
    "granitemoe": dict(logits_scaling=3.0, **MOE),
    "granitemoehybrid": dict(logits_scaling=3.0, shared_intermediate_size=32, layer_types=["mamba", "attention"], **MOE, **HYBRID),
    "cohere": dict(logit_scale=0.25),
    "cohere2": dict(logit_scale=0.25, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "falcon_h1": dict(lm_head_multiplier=0.5, embedding_multiplier=2.0, mamba_d_ssm=64, **HYBRID),
    "hyperclovax": dict(logits_scaling=3.0),
    "minicpm3": dict(dim_model_base=8, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                     qk_rope_head_dim=8, v_head_dim=8),
    "gemma2": dict(final_logit_softcapping=2.0, head_dim=8),
    "recurrent_gemma": dict(logits_soft_cap=2.0, lru_width=32, attention_window_size=16, block_types=["recurrent", "attention"]),
}


def tiny_family_model(model_type: str):
    """A tiny random causal LM of ``model_type`` (SDPA attention where the family has it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**SMALL, **SCALED_FAMILIES[model_type]})
    torch.manual_seed(0)
    attention = "eager" if model_type == "gemma2" else "sdpa"  # Gemma 2 has no SDPA path
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


def paired_rows(vocab: int):
    """:func:`make_batch` with rows 0 and 2 sharing their prompt, so that ``prefix`` shares one."""
    ids, attention, completion = make_batch(vocab)
    ids[2, :6] = ids[0, :6]
    return ids, attention, completion


@pytest.mark.parametrize("model_type", sorted(SCALED_FAMILIES))
def test_models_that_scale_logits_in_forward_get_their_own_logps(model_type):
    model = tiny_family_model(model_type)
    batch = paired_rows(model.config.vocab_size)
    with torch.no_grad():
        expected, _ = naive_logps(model, *batch)
        for packing in ("prefix", "rows", "none"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # families that cannot pack say so and run padded
                logps, _ = completion_logps(model, *batch, packing=packing)
            torch.testing.assert_close(logps, expected, rtol=0, atol=1e-4, msg=lambda m, packing=packing: f"packing={packing}: {m}")


def test_a_model_whose_forward_transforms_logits_in_an_unknown_way_is_refused_in_one_line(monkeypatch):
    from dpo_lit.errors import ConfigError

    monkeypatch.delitem(dpo_lit.logps.HEAD_TRANSFORMS, "granite")  # as if Granite were a family we had not read
    model = tiny_family_model("granite")
    with pytest.raises(ConfigError, match=r"^model.model_name: GraniteForCausalLM \(granite\) transforms its logits") as error:
        completion_logps(model, *paired_rows(model.config.vocab_size))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("model_type", ["falcon_h1", "granitemoehybrid"])
def test_packed_rows_of_hybrid_models_do_not_leak_state_across_rows(model_type):
    model = tiny_family_model(model_type)
    batch = paired_rows(model.config.vocab_size)
    with torch.no_grad():
        padded, _ = completion_logps(model, *batch, packing="none")
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            for packing in ("prefix", "rows"):
                packed, _ = completion_logps(model, *batch, packing=packing)
                torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5, msg=lambda m, packing=packing: f"packing={packing}: {m}")
    assert any("carries state across positions outside attention" in str(w.message) for w in said)


# ---- the fused head: the same values and gradients as the plain path, without (M × V) tensors ----


def fused_and_plain(model, batch, **kwargs):
    """``completion_logps`` and its gradients in every parameter, fused and plain."""
    out = {}
    params = [p for p in model.parameters() if p.requires_grad]
    for fused in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # families that cannot pack say so and run padded
            logps, _ = completion_logps(model, *batch, fused=fused, **kwargs)
        weights = torch.linspace(-1, 2, logps.numel()).reshape(logps.shape)  # any upstream gradient
        out[fused] = logps.detach(), torch.autograd.grad((logps * weights).sum(), params, allow_unused=True)
    return out[True], out[False]


@pytest.mark.parametrize("model_type", ["gemma2", "cohere", "granite", "minicpm3", "hyperclovax"])
def test_the_fused_head_equals_the_plain_head_in_values_and_gradients_with_each_familys_logit_steps(model_type):
    model = tiny_family_model(model_type).train()
    model.config.attention_dropout = 0.0
    (fused, fused_grads), (plain, plain_grads) = fused_and_plain(model, paired_rows(model.config.vocab_size), chunk=3)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
    for (name, _), f, p in zip(model.named_parameters(), fused_grads, plain_grads):
        assert (f is None) == (p is None), name
        if f is not None:
            torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def llama(vocab: int, tied: bool, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**SMALL, "vocab_size": vocab, "tie_word_embeddings": tied, **config})
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("vocab", [97, 128_256], ids=["97", "128k"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_fused_head_equals_the_plain_head_for_tied_and_untied_heads_and_a_llama3_vocabulary(vocab, tied):
    model = llama(vocab, tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    (fused, fused_grads), (plain, plain_grads) = fused_and_plain(model, paired_rows(vocab), chunk=5)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
    for (name, _), f, p in zip(model.named_parameters(), fused_grads, plain_grads):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_the_fused_head_takes_the_biased_heads_gradient_and_passes_gradcheck():
    from dpo_lit.logps import fused_head

    g = torch.Generator().manual_seed(0)
    states = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=g)
    ops = (("multiply", 0.5), ("softcap", 1.5), ("divide", 0.7))  # temperature is the last divide
    assert torch.autograd.gradcheck(lambda s, w, b: fused_head(s, w, b, targets, ops, chunk=3).logps, (states, weight, bias))
    z = torch.tanh(((states @ weight.T + bias) * 0.5) / 1.5) * 1.5 / 0.7
    out = fused_head(states, weight, bias, targets, ops, chunk=2, stats=("entropy", "log_sum_sq", "is_argmax"))
    p = z.softmax(-1)
    torch.testing.assert_close(out.logps, z.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1))
    torch.testing.assert_close(out.entropy, -(p * p.log()).sum(-1))
    torch.testing.assert_close(out.log_sum_sq, (p**2).sum(-1).log())
    assert torch.equal(out.is_argmax, z.argmax(-1) == targets)


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements of any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_the_fused_head_allocates_no_tokens_by_vocabulary_tensor_in_forward_or_backward(fused):
    vocab, chunk, width = 128_256, 4, 16
    model = llama(vocab, tied=False, hidden_size=width)
    batch = paired_rows(vocab)
    scored = int(batch[2][:, 1:].sum())  # M = 32 scored tokens
    with LargestTensor() as largest:
        # padded rows: the packed path's bottom-right causal bias is a tensor subclass this mode cannot wrap
        logps, _ = completion_logps(model, *batch, chunk=chunk, fused=fused, packing="none")
        logps.sum().backward()
    if fused:  # the weight and its gradient (V × H), one chunk's (chunk × V): never (M × V)
        assert largest.most == max(vocab * width, chunk * vocab) < scored * vocab
    else:
        assert largest.most >= scored * vocab
