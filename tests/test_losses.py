"""Tests for dpo_lit.losses: hand-computed values, independent formulas, rewards, gather, CLI.

Hand-computed cases use ``h = (π_c - ref_c) - (π_r - ref_r) = 0, 10, 20`` (see ``pair_h``)
and compare with ``torch.testing.assert_close`` at default tolerances. Throughout,
``softplus(x) = log(1 + e^x)`` so ``-log σ(x) = softplus(-x)``.
"""

import math

import pytest
import torch
from conftest import log_sigmoid, per_element, random_pair
from jsonargparse import ArgumentParser
from torch.testing import assert_close

from dpo_lit.losses import (
    CombinedLoss,
    DiscoPOPLoss,
    DPOLoss,
    HingeLoss,
    IPOLoss,
    KTOLoss,
    ORPOLoss,
    PairLogps,
    PreferenceLoss,
    RobustDPOLoss,
    SFTLoss,
    SimPOLoss,
    UnpairedLogps,
)

# softplus(-1) ≈ 0.313262, softplus(-2) ≈ 0.126928
SP1, SP2 = math.log1p(math.exp(-1)), math.log1p(math.exp(-2))


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def pair_h(tokens=(1.0, 1.0, 1.0)) -> PairLogps:
    """π_c = -5, ref_c = ref_r = -8, π_r = -5, -15, -25, so h = 3 - (3, -7, -17) = (0, 10, 20)."""
    ref = t(-8.0, -8.0, -8.0)
    return PairLogps(t(-5.0, -5.0, -5.0), t(-5.0, -15.0, -25.0), ref, ref.clone(), t(*tokens), t(*tokens))










# --- hand-computed values --------------------------------------------------------------------


def test_dpo_hand_computed():
    """β = 0.1, so βh = 0, 1, 2 and the loss is softplus(-βh) = ln 2, softplus(-1), softplus(-2)."""
    assert_close(DPOLoss(beta=0.1)(pair_h()).losses, t(math.log(2), SP1, SP2))


def test_cdpo_hand_computed():
    """-(1-ε)logσ(x) - ε·logσ(-x) = softplus(-x) + ε·x (since softplus(x) = x + softplus(-x)).

    ε = 0.1, x = βh = 0, 1, 2: ln 2, softplus(-1) + 0.1, softplus(-2) + 0.2.
    """
    out = DPOLoss(beta=0.1, label_smoothing=0.1)(pair_h())
    assert_close(out.losses, t(math.log(2), SP1 + 0.1, SP2 + 0.2))


def test_robust_dpo_hand_computed():
    """[(1-ε)softplus(-x) - ε·softplus(x)]/(1-2ε) = softplus(-x) - ε·x/(1-2ε).

    ε = 0.1 gives softplus(-x) - x/8: ln 2 at h = 0 (for any ε), softplus(-1) - 1/8, softplus(-2) - 1/4.
    """
    out = RobustDPOLoss(beta=0.1, label_smoothing=0.1)(pair_h())
    assert_close(out.losses, t(math.log(2), SP1 - 0.125, SP2 - 0.25))
    assert_close(RobustDPOLoss(beta=0.1, label_smoothing=0.3)(pair_h()).losses[0], t(math.log(2))[0])


def test_ipo_hand_computed():
    """β = 0.1: (h - 1/(2β))² = (h - 5)² = 25, 25, 225; h = 0 gives 1/(4β²) = 25.

    Length-normalised with 2 tokens everywhere: h halves to 0, 5, 10, so 25, 0, 25.
    """
    assert_close(IPOLoss(beta=0.1, length_normalize=False)(pair_h()).losses, t(25.0, 25.0, 225.0))
    assert_close(IPOLoss(beta=0.1)(pair_h(tokens=(2, 2, 2))).losses, t(25.0, 0.0, 25.0))
    assert_close(IPOLoss(beta=0.5, length_normalize=False)(pair_h()).losses[0], torch.tensor(1.0))


def test_hinge_hand_computed():
    """β = 0.05: relu(1 - βh) = relu(1, 0.5, 0) = 1, 0.5, 0; h = 0 gives 1 for any β."""
    assert_close(HingeLoss(beta=0.05)(pair_h()).losses, t(1.0, 0.5, 0.0))
    assert_close(HingeLoss(beta=0.1)(pair_h()).losses, t(1.0, 0.0, 0.0))


def test_simpo_hand_computed():
    """Averages a_c = (-2/4, -4/4, -3/3) = (-0.5, -1, -1), a_r = (-2/2, -10/5, -3/3) = (-1, -2, -1).

    β = 2, γ = 1: x = 2(a_c - a_r) - 1 = 0, 1, -1, loss softplus(-x) = ln 2, softplus(-1), softplus(1).
    Rewards 2a: chosen (-1, -2, -2), rejected (-2, -4, -2); margins (1, 2, 0); accuracies (1, 1, 0).
    """
    logps = PairLogps(t(-2.0, -4.0, -3.0), t(-2.0, -10.0, -3.0), None, None, t(4, 4, 3), t(2, 5, 3))
    out = SimPOLoss(beta=2.0, gamma=1.0)(logps)
    assert_close(out.losses, t(math.log(2), SP1, math.log1p(math.e)))
    assert_close(out.chosen_rewards, t(-1.0, -2.0, -2.0))
    assert_close(out.rejected_rewards, t(-2.0, -4.0, -2.0))
    assert_close(out.margins, t(1.0, 2.0, 0.0))
    assert_close(out.accuracies, t(1.0, 1.0, 0.0))


def test_orpo_hand_computed():
    """P_c = exp(a_c) = 1/2, 2/3, 1/2 (odds 1, 2, 1); P_r = 1/3, 1/3, 1/2 (odds 1/2, 1/2, 1).

    log odds ratio = ln 2, ln 4, 0; -logσ: -ln(2/3) = ln 1.5, -ln(4/5) = ln 1.25, ln 2.
    NLL = -a_c = ln 2, ln 1.5, ln 2. λ = 0.1: loss = NLL + 0.1·(ln 1.5, ln 1.25, ln 2).
    Two tokens per completion, so the summed log-probs are 2a.
    """
    a_c, a_r = (
        t(math.log(1 / 2), math.log(2 / 3), math.log(1 / 2)),
        t(math.log(1 / 3), math.log(1 / 3), math.log(1 / 2)),
    )
    two = t(2, 2, 2)
    out = ORPOLoss(lam=0.1)(PairLogps(2 * a_c, 2 * a_r, None, None, two, two))
    nll = t(math.log(2), math.log(1.5), math.log(2))
    assert_close(out.losses, nll + 0.1 * t(math.log(1.5), math.log(1.25), math.log(2)))
    assert_close(out.loss, out.losses.mean())
    assert_close(out.metrics["nll"], nll.mean())
    assert_close(out.metrics["log_odds_ratio"], torch.tensor((math.log(2) + math.log(4)) / 3))
    assert_close(out.chosen_rewards, 0.1 * a_c)


def test_sft_hand_computed():
    """-(-4)/2 = 2 and -(-6)/3 = 2; rewards are average log-probs (-2, -2) and (-1, -3)."""
    out = SFTLoss()(PairLogps(t(-4.0, -6.0), t(-3.0, -9.0), None, None, t(2, 3), t(3, 3)))
    assert_close(out.losses, t(2.0, 2.0))
    assert_close(out.margins, t(-1.0, 1.0))


# --- independent formulas on random inputs ---------------------------------------------------


def _dpo(b, eps):
    return lambda pc, pr, rc, rr, ct, rt: (
        -(1 - eps) * log_sigmoid(b * ((pc - rc) - (pr - rr)))
        - eps * log_sigmoid(-b * ((pc - rc) - (pr - rr)))
    )


def _rdpo(b, eps):
    def f(pc, pr, rc, rr, ct, rt):
        h = (pc - rc) - (pr - rr)
        return (-(1 - eps) * log_sigmoid(b * h) + eps * log_sigmoid(-b * h)) / (1 - 2 * eps)

    return f


def _orpo(lam):
    def f(pc, pr, rc, rr, ct, rt):
        ac, ar = pc / ct, pr / rt
        odds = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
        return -ac - lam * log_sigmoid(odds)

    return f


@pytest.mark.parametrize(
    "loss, formula",
    [
        (DPOLoss(beta=0.1), _dpo(0.1, 0.0)),
        (DPOLoss(beta=0.3, label_smoothing=0.2), _dpo(0.3, 0.2)),
        (RobustDPOLoss(beta=0.2, label_smoothing=0.1), _rdpo(0.2, 0.1)),
        (
            IPOLoss(beta=0.1, length_normalize=False),
            lambda pc, pr, rc, rr, ct, rt: ((pc - rc) - (pr - rr) - 5.0) ** 2,
        ),
        (IPOLoss(beta=0.2), lambda pc, pr, rc, rr, ct, rt: ((pc - rc) / ct - (pr - rr) / rt - 2.5) ** 2),
        (HingeLoss(beta=0.1), lambda pc, pr, rc, rr, ct, rt: max(0.0, 1 - 0.1 * ((pc - rc) - (pr - rr)))),
        (
            SimPOLoss(beta=2.5, gamma=0.5),
            lambda pc, pr, rc, rr, ct, rt: -log_sigmoid(2.5 * pc / ct - 2.5 * pr / rt - 0.5),
        ),
        (ORPOLoss(lam=0.2), _orpo(0.2)),
        (SFTLoss(), lambda pc, pr, rc, rr, ct, rt: -pc / ct),
    ],
    ids=["dpo", "cdpo", "rdpo", "ipo_summed", "ipo_normalized", "hinge", "simpo", "orpo", "sft"],
)
def test_against_independent_formula(loss, formula):
    logps = random_pair()
    out = loss(logps)
    expected = per_element(formula, logps)
    assert_close(out.losses, expected)
    assert_close(out.loss, expected.mean())


# --- rewards, margins, accuracies, validation ------------------------------------------------


@pytest.mark.parametrize("cls", [DPOLoss, RobustDPOLoss, HingeLoss])
def test_rewards_detached_and_correct(cls):
    logps = random_pair()
    for x in (logps.policy_chosen, logps.policy_rejected):
        x.requires_grad_(True)
    out = cls(beta=0.3)(logps)
    chosen = 0.3 * (logps.policy_chosen - logps.ref_chosen).detach()
    rejected = 0.3 * (logps.policy_rejected - logps.ref_rejected).detach()
    for x in (out.chosen_rewards, out.rejected_rewards, out.margins, out.accuracies):
        assert x.grad_fn is None and not x.requires_grad
    assert out.loss.grad_fn is not None
    assert_close(out.chosen_rewards, chosen)
    assert_close(out.rejected_rewards, rejected)
    assert_close(out.margins, chosen - rejected)
    assert_close(out.accuracies, (chosen > rejected).float())


def test_dpo_rewards_hand_computed():
    """β = 0.1: chosen 0.1·(-5 - -8) = 0.3; rejected 0.1·(3, -7, -17); margins = βh = 0, 1, 2."""
    out = DPOLoss(beta=0.1)(pair_h())
    assert_close(out.chosen_rewards, t(0.3, 0.3, 0.3))
    assert_close(out.rejected_rewards, t(0.3, -0.7, -1.7))
    assert_close(out.margins, t(0.0, 1.0, 2.0))
    assert_close(out.accuracies, t(0.0, 1.0, 1.0))


@pytest.mark.parametrize("loss", [DPOLoss(), RobustDPOLoss(), IPOLoss(), HingeLoss()])
def test_missing_reference_raises(loss):
    logps = pair_h()
    logps.ref_chosen = logps.ref_rejected = None
    with pytest.raises(ValueError, match=f"{type(loss).__name__} needs reference log-probs"):
        loss(logps)


def test_flags_and_validation():
    assert [c.needs_reference for c in (DPOLoss, RobustDPOLoss, IPOLoss, HingeLoss, KTOLoss)] == [True] * 5
    assert [c.needs_reference for c in (SimPOLoss, ORPOLoss, SFTLoss)] == [False] * 3
    assert KTOLoss.data_mode == "unpaired" and DPOLoss.data_mode == "paired"
    for make in (
        lambda: DPOLoss(beta=0),
        lambda: DPOLoss(label_smoothing=0.5),
        lambda: RobustDPOLoss(label_smoothing=0.5),
        lambda: IPOLoss(beta=-1.0),
    ):
        with pytest.raises(ValueError):
            make()


# --- KTO -------------------------------------------------------------------------------------


def kto_logps(policy_kl=(-3.0, -1.0, -2.0, -2.0)) -> UnpairedLogps:
    """ref = -20, policy = -18, -8, -18, -28 so r = 2, 12, 2, -8; ref_kl = -4 gives z0 = mean(1, 3, 2, 2) = 2."""
    return UnpairedLogps(
        t(-18.0, -8.0, -18.0, -28.0),
        t(-20.0, -20.0, -20.0, -20.0),
        t(1, 1, 1, 1),
        torch.tensor([True, True, False, False]),
        t(*policy_kl),
        t(-4.0, -4.0, -4.0, -4.0),
    )


def test_kto_hand_computed():
    """β = 0.1, z0 = 2. Desirable: 1 - σ(β(r - z0)) = 1 - σ(0), 1 - σ(1) = 0.5, σ(-1).
    Undesirable: 1 - σ(β(z0 - r)) = 1 - σ(0), 1 - σ(1) = 0.5, σ(-1). λ_D = 2, λ_U = 1:
    losses = 1, 2σ(-1), 0.5, σ(-1); loss = (1.5 + 3σ(-1)) / 4. Rewards β·r split by label.
    """
    s = 1 / (1 + math.e)
    out = KTOLoss(beta=0.1, desirable_weight=2.0, undesirable_weight=1.0)(kto_logps())
    assert_close(out.metrics["kto_z0"], torch.tensor(2.0))
    assert_close(out.losses, t(1.0, 2 * s, 0.5, s))
    assert_close(out.loss, torch.tensor((1.5 + 3 * s) / 4))
    assert_close(out.chosen_rewards, t(0.2, 1.2))
    assert_close(out.rejected_rewards, t(0.2, -0.8))
    assert out.margins is None and out.accuracies is None


def test_kto_z0_clamped_at_zero():
    """policy_kl - ref_kl = -1, -3 → mean -2 → z0 = 0; then r = 2: 1 - σ(0.2) for a desirable example."""
    logps = kto_logps(policy_kl=(-5.0, -7.0, -5.0, -7.0))
    out = KTOLoss(beta=0.1)(logps)
    assert_close(out.metrics["kto_z0"], torch.tensor(0.0))
    assert_close(out.losses[0], torch.tensor(1 - 1 / (1 + math.exp(-0.2)), dtype=torch.float32))


def test_kto_z0_detached_and_all_desirable():
    logps = kto_logps()
    logps.label = torch.ones(4, dtype=torch.bool)
    logps.policy.requires_grad_(True)
    logps.policy_kl.requires_grad_(True)
    out = KTOLoss()(logps)
    out.loss.backward()
    assert logps.policy_kl.grad is None
    assert torch.all(logps.policy.grad < 0)  # raising a desirable log-prob lowers the loss
    assert out.rejected_rewards.shape == (0,) and out.chosen_rewards.shape == (4,)
    assert torch.isfinite(out.loss)


def test_kto_against_independent_formula():
    g = torch.Generator().manual_seed(1)
    policy, ref, pkl, rkl = (-torch.rand(12, generator=g, dtype=torch.float64) * 30 for _ in range(4))
    label = torch.rand(12, generator=g) > 0.5
    out = KTOLoss(beta=0.2, desirable_weight=1.5, undesirable_weight=0.7)(
        UnpairedLogps(policy, ref, torch.ones(12), label, pkl, rkl)
    )
    z0 = max(0.0, sum(p - r for p, r in zip(pkl.tolist(), rkl.tolist())) / 12)
    expected = [
        1.5 * (1 - 1 / (1 + math.exp(-0.2 * (p - r - z0))))
        if lab
        else 0.7 * (1 - 1 / (1 + math.exp(-0.2 * (z0 - (p - r)))))
        for p, r, lab in zip(policy.tolist(), ref.tolist(), label.tolist())
    ]
    assert_close(out.loss, torch.tensor(sum(expected) / 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="KTOLoss needs reference"):
        KTOLoss()(UnpairedLogps(policy, None, torch.ones(12), label, pkl, None))


# --- ORPO numerics ---------------------------------------------------------------------------


def test_orpo_finite_near_zero_and_very_negative():
    pc = t(0.0, -1e-9, -1e4, -3.0, 0.0).requires_grad_(True)
    pr = t(-1e4, 0.0, -1e-9, 0.0, 0.0).requires_grad_(True)
    ones = torch.ones(5)
    out = ORPOLoss(lam=0.5)(PairLogps(pc, pr, None, None, ones, ones))
    out.loss.backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.loss)
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


# --- DiscoPOP numerics -----------------------------------------------------------------------


def test_discopop_is_finite_far_below_minus_88():
    """In float32 ``exp(-x)`` overflows once x = βh < -88.7, and the literal
    ``(1 - σ(x/τ))·softplus(-x) + σ(x/τ)·exp(-x)`` (TRL's) is inf·0 = NaN there. Ours is
    softplus(-x) = -x, σ(x/τ) being 0, and its gradient in π_c is -β."""
    beta, tau = 0.1, 0.05
    x = t(-88.8, -100.0, -1e3, -1e4, -1e6)
    pc = (x / beta).requires_grad_(True)  # h = π_c: the other three log-probs are 0
    zeros = torch.zeros(5)
    out = DiscoPOPLoss(beta=beta, tau=tau)(PairLogps(pc, zeros, zeros, zeros, torch.ones(5), torch.ones(5)))
    out.losses.sum().backward()
    assert out.losses.dtype == torch.float32
    assert_close(out.losses, -x)
    assert_close(pc.grad, torch.full((5,), -beta))
    mix = torch.sigmoid(x / tau)
    assert torch.isnan((1 - mix) * torch.nn.functional.softplus(-x) + mix * torch.exp(-x)).all()


# --- gather ----------------------------------------------------------------------------------


def test_gather_paired():
    policy, ref, tokens = torch.arange(6.0), torch.arange(6.0) + 10, torch.arange(6) + 1
    logps = DPOLoss().logps_from_rows(policy, ref, tokens, {})
    assert_close(logps.policy_chosen, t(0.0, 1.0, 2.0))
    assert_close(logps.policy_rejected, t(3.0, 4.0, 5.0))
    assert_close(logps.ref_chosen, t(10.0, 11.0, 12.0))
    assert_close(logps.ref_rejected, t(13.0, 14.0, 15.0))
    assert logps.chosen_tokens.tolist() == [1, 2, 3] and logps.rejected_tokens.tolist() == [4, 5, 6]
    no_ref = SimPOLoss().logps_from_rows(policy, None, tokens, {})
    assert no_ref.ref_chosen is None and no_ref.ref_rejected is None
    with pytest.raises(ValueError, match="even number of rows"):
        DPOLoss().logps_from_rows(torch.zeros(5), None, torch.ones(5), {})


def test_gather_unpaired():
    label = torch.tensor([True, False, True])
    logps = KTOLoss().logps_from_rows(torch.arange(6.0), torch.arange(6.0) + 10, torch.arange(6) + 1, {"label": label})
    assert_close(logps.policy, t(0.0, 1.0, 2.0))
    assert_close(logps.policy_kl, t(3.0, 4.0, 5.0))
    assert_close(logps.ref, t(10.0, 11.0, 12.0))
    assert_close(logps.ref_kl, t(13.0, 14.0, 15.0))
    assert logps.tokens.tolist() == [1, 2, 3] and logps.label.tolist() == [True, False, True]
    assert isinstance(KTOLoss()(logps).loss, torch.Tensor)


# --- CombinedLoss ----------------------------------------------------------------------------


def test_combined_is_weighted_sum():
    logps = random_pair()
    dpo, sft, orpo = DPOLoss(beta=0.2), SFTLoss(), ORPOLoss()
    out = CombinedLoss([dpo, sft, orpo], weights=[1.0, 0.5, 2.0])(logps)
    parts = [dpo(logps), sft(logps), orpo(logps)]
    assert_close(out.losses, parts[0].losses + 0.5 * parts[1].losses + 2.0 * parts[2].losses)
    assert_close(out.loss, parts[0].loss + 0.5 * parts[1].loss + 2.0 * parts[2].loss)
    assert_close(out.margins, parts[0].margins)
    assert_close(out.metrics["sft/loss"], parts[1].loss)
    assert_close(out.metrics["orpo/nll"], parts[2].metrics["nll"])
    assert set(out.metrics) == {"dpo/loss", "sft/loss", "orpo/loss", "orpo/log_odds_ratio", "orpo/nll"}


def test_combined_flags_and_errors():
    assert CombinedLoss([SFTLoss(), DPOLoss()]).needs_reference
    assert not CombinedLoss([SFTLoss(), SimPOLoss()]).needs_reference
    assert CombinedLoss([KTOLoss(), KTOLoss()]).data_mode == "unpaired"
    with pytest.raises(ValueError, match="data_mode"):
        CombinedLoss([DPOLoss(), KTOLoss()])
    with pytest.raises(ValueError, match="weights"):
        CombinedLoss([DPOLoss(), SFTLoss()], weights=[1.0])


# --- jsonargparse ----------------------------------------------------------------------------

COMBINED_YAML = """
loss:
  class_path: dpo_lit.losses.CombinedLoss
  init_args:
    losses:
      - class_path: dpo_lit.losses.DPOLoss
        init_args: {beta: 0.1}
      - class_path: dpo_lit.losses.SFTLoss
    weights: [1.0, 0.5]
"""


def loss_parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--loss", type=PreferenceLoss)
    return parser


def test_jsonargparse_combined_yaml():
    parser = loss_parser()
    loss = parser.instantiate(parser.parse_string(COMBINED_YAML)).loss
    assert isinstance(loss, CombinedLoss) and loss.weights == [1.0, 0.5]
    assert isinstance(loss.parts[0], DPOLoss) and loss.parts[0].beta == 0.1
    assert isinstance(loss.parts[1], SFTLoss)


def test_jsonargparse_short_names():
    parser = loss_parser()
    loss = parser.instantiate(parser.parse_args(["--loss=IPOLoss", "--loss.beta=0.3"])).loss
    assert isinstance(loss, IPOLoss) and loss.beta == 0.3 and loss.length_normalize
    cfg = parser.parse_object({"loss": {"class_path": "CombinedLoss", "init_args": {"losses": ["KTOLoss"]}}})
    assert isinstance(parser.instantiate(cfg).loss.parts[0], KTOLoss)
