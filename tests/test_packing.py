"""Packed rows and shared prompts give the padded rows' log-probs and gradients."""

import warnings

import pytest
import torch

from dpo_lit.data.collate import PreferenceCollator, pad_rows
from dpo_lit.logps import LogpsOptions, completion_logps
from dpo_lit.packing import layout


@pytest.fixture(scope="module")
def tiny_model():
    from dpo_lit.models import TINY_ALIAS, load_model

    return load_model(TINY_ALIAS)


def paired_batch(vocab: int, left: bool = False, seed: int = 0):
    """3 pairs of different prompt and completion lengths, as the collator lays them out."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompts = [draw(n) for n in (5, 9, 3)]
    chosen = [draw(n) for n in (4, 2, 7)]
    rejected = [draw(n) for n in (6, 3, 1)]
    return pad_rows(
        [p + c for p, c in zip(prompts + prompts, chosen + rejected)], 0,
        first_scored=[len(p) for p in prompts + prompts], left=left,
    )


def grads_of(model, *args, **kwargs):
    logps, tokens = completion_logps(model, *args, **kwargs)
    loss = logps[..., 0].sum() if logps.ndim == 2 else logps.sum()
    return logps.detach(), tokens, torch.autograd.grad(loss, list(model.parameters()))


def test_layout_of_a_paired_batch_computes_each_prompt_once():
    ids, attention, completion = paired_batch(50)
    plan = layout(ids, attention, completion)
    # 17 prompt tokens once, 13 chosen and 10 rejected tokens: no padding, no second prompt
    assert plan.input_ids.shape == (1, 40)
    assert [s.prefix is None for s in plan.segments] == [True, True, True, False, False, False]
    flat = plan.input_ids[0]
    real = attention.bool()
    assert torch.equal(flat[plan.where[real]], ids[real])  # every real token maps onto itself
    assert (plan.where[~real] == -1).all()
    # a rejected row's prompt positions are its chosen row's, its completion continues their positions
    assert torch.equal(plan.where[3, :5], plan.where[0, :5])
    assert plan.position_ids[0, plan.where[3, 5]].item() == 5
    unshared = layout(ids, attention, completion, share_prompts=False)
    assert unshared.input_ids.shape == (1, attention.sum().item()) and all(s.prefix is None for s in unshared.segments)


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("packing", ["rows", "prefix"])
def test_packed_logps_and_gradients_equal_padded_rows(tiny_model, packing, left):
    batch = paired_batch(tiny_model.config.vocab_size, left=left)
    padded, tokens, padded_grads = grads_of(tiny_model, *batch, packing="none")
    packed, packed_tokens, packed_grads = grads_of(tiny_model, *batch, packing=packing)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert torch.equal(packed_tokens, tokens)
    for p, g in zip(packed_grads, padded_grads):
        torch.testing.assert_close(p, g, rtol=1e-4, atol=1e-6)


def test_prompt_sharing_follows_the_tokens_not_the_row_order(tiny_model, tiny_tokenizer):
    """KTO's unpaired rows (matched, then each prompt with another's completion), a row without a
    prompt and LD-DPO's weights with WPO's aligned column: the same values packed and padded."""
    examples = [
        {"prompt_ids": [5, 6, 7, 8], "completion_ids": [9, 10, 11], "label": True},
        {"prompt_ids": [5, 6, 7, 8], "completion_ids": [12], "label": False},
        {"prompt_ids": [20, 21], "completion_ids": [22, 23, 24, 25, 26], "label": True},
    ]
    batch = PreferenceCollator(tiny_tokenizer.pad_token_id)(examples)
    args = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    plan = layout(*args)
    assert sum(s.prefix is not None for s in plan.segments) == 4  # 6 rows, 2 distinct prompts
    padded, _, _ = grads_of(tiny_model, *args, packing="none")
    packed, _, _ = grads_of(tiny_model, *args, packing="prefix")
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)

    ids, attention, completion = paired_batch(tiny_model.config.vocab_size, seed=3)
    completion[2, : attention[2].sum()] = True  # the third chosen row is all completion
    options = LogpsOptions(ld_alpha=0.5, aligned=True)
    padded, _, grads = grads_of(tiny_model, ids, attention, completion, options=options, packing="none")
    packed, _, packed_grads = grads_of(tiny_model, ids, attention, completion, options=options, packing="prefix")
    assert packed.shape == (6, 2)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for p, g in zip(packed_grads, grads):
        torch.testing.assert_close(p, g, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_recomputes_the_packed_attention(tiny_model):
    from dpo_lit.models import TINY_ALIAS, load_model

    model = load_model(TINY_ALIAS)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = paired_batch(model.config.vocab_size, seed=5)
    _, _, expected = grads_of(tiny_model, *batch, packing="none")
    _, _, grads = grads_of(model, *batch, packing="prefix")
    for p, g in zip(grads, expected):
        torch.testing.assert_close(p, g, rtol=1e-4, atol=1e-6)


def test_a_model_with_other_attention_falls_back_to_padded_rows():
    from dpo_lit.models import TINY_ALIAS, load_model

    model = load_model(TINY_ALIAS)
    model.set_attn_implementation("eager")
    batch = paired_batch(model.config.vocab_size, seed=7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        packed, _ = completion_logps(model, *batch, packing="prefix")
    assert any("computed padded" in str(w.message) for w in caught)
    padded, _ = completion_logps(model, *batch, packing="none")
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


def test_a_segment_after_a_shared_prompt_attends_through_the_bottom_right_causal_bias():
    """The rejected row's queries see the whole prompt and their own earlier tokens: exactly the
    boolean mask tril(diagonal=prompt length), here without a mask tensor."""
    from dpo_lit.packing import _segment_attention

    ids, attention, completion = paired_batch(97)
    plan = layout(ids, attention, completion)
    after = [seg for seg in plan.segments if seg.prefix is not None]
    assert after and all(not hasattr(seg, "mask") for seg in plan.segments)
    g = torch.Generator().manual_seed(0)
    length = plan.input_ids.shape[1]
    q = torch.randn(1, 4, length, 8, generator=g)
    k, v = torch.randn(1, 2, length, 8, generator=g), torch.randn(1, 2, length, 8, generator=g)
    out = _segment_attention(q, k, v, plan, 0.0, None)  # (1, L, 4, 8)
    for seg in after:
        (a, b), rest = seg.prefix, seg.end - seg.start
        keys = torch.cat([k[:, :, a:b], k[:, :, seg.start : seg.end]], 2)
        values = torch.cat([v[:, :, a:b], v[:, :, seg.start : seg.end]], 2)
        mask = torch.ones(rest, b - a + rest, dtype=torch.bool).tril(diagonal=b - a)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, seg.start : seg.end], keys, values, attn_mask=mask, enable_gqa=True
        )
        torch.testing.assert_close(out[0, seg.start : seg.end], expected[0].transpose(0, 1), rtol=0, atol=1e-6)


def test_the_packed_forward_builds_no_attention_mask(tiny_model, monkeypatch):
    """transformers would build a dense (1, 1, L, L) mask from the packed position_ids that the
    segments never read; the packed forward asks for none, the padded one still does."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    built = []
    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"]

    def spy(*args, **kwargs):
        mask = sdpa_mask(*args, **kwargs)
        built.append(None if mask is None else tuple(mask.shape))
        return mask

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    batch = paired_batch(tiny_model.config.vocab_size)
    with torch.no_grad():
        packed, _ = completion_logps(tiny_model, *batch, packing="prefix")
        assert built == []
        padded, _ = completion_logps(tiny_model, *batch, packing="none")
    assert built  # the padded rows' own mask
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert tiny_model.config._attn_implementation == "sdpa"  # restored after the packed forward


def test_packed_rows_under_bf16_autocast_equal_padded_rows(tiny_model):
    """Under autocast RoPE leaves queries and keys float32 and values bf16; the segments cast them
    as SDPA's autocast does (the bottom-right bias checks dtypes before autocast would)."""
    batch = paired_batch(tiny_model.config.vocab_size, seed=3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed, _ = completion_logps(tiny_model, *batch, packing="prefix")
        padded, _ = completion_logps(tiny_model, *batch, packing="none")
    with torch.no_grad():
        full, _ = completion_logps(tiny_model, *batch, packing="none")
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-2)
    assert (padded - full).abs().max() > 1e-4  # bf16 did compute them
