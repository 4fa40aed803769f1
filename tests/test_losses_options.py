"""WPO weighting and LD-DPO length desensitisation: the log-prob options and the wrappers.

The log-prob side is checked against a full-vocabulary log-softmax of the tiny model with
per-row Python loops; the loss side against hand-worked weights; the module side by the fact
that the first step (policy = reference) must still give DPO's ln 2 per pair.
"""

import math
from pathlib import Path

import pytest
import torch
from conftest import make_batch, per_element, random_pair
from lightning import Trainer
from torch.testing import assert_close

import dpo_lit
from dpo_lit.data import PreferenceDataModule
from dpo_lit.logps import LogpsOptions, completion_logps, ld_token_weights, reference_options
from dpo_lit.losses import (
    AOTLoss,
    CombinedLoss,
    DPOLoss,
    IPOLoss,
    KTOLoss,
    LDDPOLoss,
    PairLogps,
    SFTLoss,
    WPOLoss,
)
from dpo_lit.models import TINY_ALIAS, load_model
from dpo_lit.module import PreferenceModule

ASSETS = Path(dpo_lit.__file__).parent / "assets"


@pytest.fixture(scope="module")
def tiny_model():
    return load_model(TINY_ALIAS)


def naive_tokens(model, ids, attention, completion):
    """Per-position log-prob of the next token, log Σ_v p_v², and the scored mask, all (N, T-1)."""
    logp = model(input_ids=ids, attention_mask=attention).logits.float()[:, :-1].log_softmax(-1)  # (N, T-1, V)
    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return picked, torch.logsumexp(2 * logp, dim=-1), completion[:, 1:]


# --- the log-prob computation ----------------------------------------------------------------


def test_ld_token_weights_hand_worked():
    """Completion lengths (3, 1 | 2, 3): pair 0 shares 2 tokens (row 0's third weighs α), pair 1
    shares 1 (row 3's second and third weigh α)."""
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    weights = ld_token_weights(mask, 0.25)
    assert weights.tolist() == [1, 1, 0.25, 1, 1, 1, 1, 0.25, 0.25]
    with pytest.raises(ValueError, match="paired rows"):
        ld_token_weights(mask[:3], 0.25)


def test_no_options_leave_the_sums_unchanged(tiny_model):
    ids, attention, completion = make_batch(tiny_model.config.vocab_size)
    plain, tokens = completion_logps(tiny_model, ids, attention, completion, chunk=5)
    for options in (LogpsOptions(), LogpsOptions(ld_alpha=1.0)):
        logps, same_tokens = completion_logps(tiny_model, ids, attention, completion, 5, options)
        assert_close(logps, plain)
        assert torch.equal(same_tokens, tokens)


def test_ld_sums_and_gradients_match_a_loop(tiny_model):
    """Rows 1 and 3 are a pair of 5 and 7 completion tokens: row 3's last 2 weigh α."""
    alpha = 0.3
    ids, attention, completion = make_batch(tiny_model.config.vocab_size)
    logps, _ = completion_logps(tiny_model, ids, attention, completion, 5, LogpsOptions(ld_alpha=alpha))
    picked, _, mask = naive_tokens(tiny_model, ids, attention, completion)
    n = len(ids)
    lengths = mask.sum(-1).tolist()
    assert lengths == [10, 5, 10, 7]
    expected = []
    for row in range(n):
        shared = min(lengths[row], lengths[(row + n // 2) % n])
        values = picked[row][mask[row]]
        expected.append(sum(v * (1.0 if k < shared else alpha) for k, v in enumerate(values)))
    expected = torch.stack(expected)
    assert_close(logps, expected)
    params = list(tiny_model.parameters())
    for got, want in zip(torch.autograd.grad(logps.sum(), params), torch.autograd.grad(expected.sum(), params)):
        assert_close(got, want, rtol=1e-4, atol=1e-6)  # float32 sums in two orders


def test_aligned_column_matches_full_softmax(tiny_model):
    ids, attention, completion = make_batch(tiny_model.config.vocab_size, seed=2)
    logps, _ = completion_logps(tiny_model, ids, attention, completion, 3, LogpsOptions(aligned=True))
    picked, log_sq, mask = naive_tokens(tiny_model, ids, attention, completion)
    assert logps.shape == (4, 2)
    assert_close(logps[:, 0], (picked * mask).sum(-1))
    assert_close(logps[:, 1], ((picked - log_sq) * mask).sum(-1))
    assert logps[:, 0].requires_grad
    grads = torch.autograd.grad(logps[:, 1].sum(), list(tiny_model.parameters()), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)  # the aligned column carries no gradient


def test_reference_options_drop_the_aligned_column():
    assert reference_options(None) is None
    assert reference_options(LogpsOptions(aligned=True)) is None
    assert reference_options(LogpsOptions(ld_alpha=0.5, aligned=True)) == LogpsOptions(ld_alpha=0.5)


# --- the wrappers ----------------------------------------------------------------------------


def wpo_rows():
    """B = 2, two tokens per completion. Policy rows (4, 2): [sum, aligned sum]; h = 0 and 10 as in
    test_losses.pair_h. Aligned sums 2·ln ½ (chosen) and 2·ln ¼ (rejected): w = ½ and ¼, weight ⅛."""
    sums = torch.tensor([-5.0, -5.0, -5.0, -15.0])
    aligned = torch.tensor([2 * math.log(0.5)] * 2 + [2 * math.log(0.25)] * 2)
    return torch.stack([sums, aligned], dim=-1), torch.full((4,), -8.0), torch.full((4,), 2.0)


def test_wpo_hand_computed():
    """DPO, β = 0.1: ln 2 and softplus(-1), each times w_c·w_r = ½·¼ = ⅛."""
    loss = WPOLoss(DPOLoss(beta=0.1))
    policy, ref, tokens = wpo_rows()
    logps = loss.logps_from_rows(policy, ref, tokens, {})
    assert_close(logps.policy_chosen, torch.tensor([-5.0, -5.0]))
    assert_close(logps.aligned_rejected, torch.tensor([2 * math.log(0.25)] * 2))
    out = loss(logps)
    assert_close(out.losses, torch.tensor([math.log(2), math.log1p(math.exp(-1))]) / 8)
    assert_close(out.loss, out.losses.mean())
    assert_close(out.metrics["wpo_weight"], torch.tensor(0.125))
    assert_close(out.margins, torch.tensor([0.0, 1.0]))  # the wrapped loss's rewards, unweighted


def test_wpo_against_independent_formula():
    logps = random_pair(seed=7)
    g = torch.Generator().manual_seed(8)
    logps.aligned_chosen = -torch.rand(16, generator=g, dtype=torch.float64) * 20
    logps.aligned_rejected = -torch.rand(16, generator=g, dtype=torch.float64) * 20
    out = WPOLoss(IPOLoss(beta=0.2))(logps)
    ipo = per_element(lambda pc, pr, rc, rr, ct, rt: ((pc - rc) / ct - (pr - rr) / rt - 2.5) ** 2, logps)
    ct, rt = logps.chosen_tokens.double(), logps.rejected_tokens.double()
    weights = torch.exp(logps.aligned_chosen / ct + logps.aligned_rejected / rt)
    assert_close(out.losses, ipo * weights)
    assert_close(out.loss, (ipo * weights).mean())


def test_wpo_weights_have_no_gradient():
    policy, ref, tokens = wpo_rows()
    policy.requires_grad_(True)
    loss = WPOLoss(DPOLoss(beta=0.1))
    loss(loss.logps_from_rows(policy, ref, tokens, {})).loss.backward()
    assert policy.grad[:, 1].abs().sum() == 0 and policy.grad[:, 0].abs().sum() > 0


def test_wrappers_refuse_what_they_cannot_wrap():
    with pytest.raises(ValueError, match="not per example"):
        WPOLoss(AOTLoss())
    for wrapper in (WPOLoss, LDDPOLoss):
        with pytest.raises(ValueError, match="wraps paired losses only"):
            wrapper(KTOLoss())
    with pytest.raises(ValueError, match="alpha"):
        LDDPOLoss(DPOLoss(), alpha=1.5)
    pair = random_pair()
    with pytest.raises(ValueError, match="aligned log-probs"):
        WPOLoss(DPOLoss())(pair)  # a container made without WPO's gather


def test_ld_wrapper_asks_for_weights_and_computes_the_wrapped_loss():
    loss = LDDPOLoss(IPOLoss(beta=0.2), alpha=0.25)
    assert loss.logps_options == LogpsOptions(ld_alpha=0.25)
    assert loss.needs_reference and LDDPOLoss(SFTLoss()).needs_reference is False
    logps = random_pair()
    assert_close(loss(logps).losses, IPOLoss(beta=0.2)(logps).losses)


def test_wrappers_nest_and_combine():
    both = LogpsOptions(ld_alpha=0.5, aligned=True)
    assert WPOLoss(LDDPOLoss(DPOLoss())).logps_options == both
    assert LDDPOLoss(WPOLoss(DPOLoss())).logps_options == both
    policy, ref, tokens = wpo_rows()
    out = LDDPOLoss(WPOLoss(DPOLoss(beta=0.1))).logps_from_rows(policy, ref, tokens, {})
    assert out.aligned_chosen is not None
    assert CombinedLoss([WPOLoss(DPOLoss()), SFTLoss()]).logps_options == LogpsOptions(aligned=True)
    assert CombinedLoss([DPOLoss(), SFTLoss()]).logps_options is None
    with pytest.raises(ValueError, match="only its first part"):
        CombinedLoss([SFTLoss(), LDDPOLoss(DPOLoss())])
    combined = WPOLoss(CombinedLoss([DPOLoss(beta=0.1), SFTLoss()]))
    assert combined.logps_options == LogpsOptions(aligned=True)
    assert isinstance(combined.logps_from_rows(policy, ref, tokens, {}), PairLogps)


# --- through the module ----------------------------------------------------------------------


def first_step(loss, reference, tmp_path):
    module = PreferenceModule(TINY_ALIAS, loss=loss, reference=reference,
                              optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    data = PreferenceDataModule(
        tokenizer_name=TINY_ALIAS, train_files=[str(ASSETS / "tiny_pairs.jsonl")],
        val_files=[str(ASSETS / "tiny_pairs_val.jsonl")], batch_size=4, max_length=256, max_prompt_length=128,
    )
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      limit_val_batches=0)
    trainer.fit(module, datamodule=data)  # step 1's metrics are computed before the update
    return trainer.callback_metrics


@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_ld_dpo_desensitises_the_reference_too(tmp_path, monkeypatch, reference):
    """Policy = reference at step 1: with both desensitised the same way every log-ratio is 0 and
    DPO gives ln 2; the precomputed table of LD-DPO is a different file from plain DPO's."""
    monkeypatch.setenv("DPO_LIT_CACHE", str(tmp_path / "cache"))
    metrics = first_step(LDDPOLoss(DPOLoss(beta=0.1), alpha=0.2), reference, tmp_path)
    assert_close(metrics["train/loss"], torch.tensor(math.log(2)))
    assert_close(metrics["train/rewards/margins"], torch.tensor(0.0), atol=1e-5, rtol=0)
    if reference == "precomputed":
        first_step(DPOLoss(beta=0.1), reference, tmp_path)
        # train only (limit_val_batches=0: no validation example is used, none computed), LD and plain
        assert len(list((tmp_path / "cache" / "ref_logps").glob("*.pt"))) == 2


def test_wpo_through_the_module(tmp_path):
    """Step 1: every DPO loss is ln 2, so the mean weighted loss is ln 2 times the mean weight."""
    metrics = first_step(WPOLoss(DPOLoss(beta=0.1)), "copy", tmp_path)
    weight = metrics["train/wpo_weight"]
    assert 0 < float(weight) < 1e3
    assert_close(metrics["train/loss"], math.log(2) * weight)
