"""Tests for the rest of the DPO family (APO, NCA, EXO, SPPO, AOT, DiscoPOP, BCO, f-DPO).

Hand-computed cases set the log-ratios directly (``ratios``: c = π_c - ref_c, r = π_r - ref_r)
and pick them so the sigmoids are 1/4, 1/2, 3/4: σ(ln 3) = 3/4. ``softplus(x) = log(1 + e^x)``
so ``-log σ(x) = softplus(-x)``. Independent formulas run on random float64 inputs; all
comparisons use ``torch.testing.assert_close`` at default tolerances.
"""

import math

import pytest
import torch
from conftest import log_sigmoid, per_element, random_pair
from torch.testing import assert_close

from dpo_lit.errors import ConfigError
from dpo_lit.losses import (
    AOTLoss,
    AOTPairLoss,
    APODownLoss,
    APOZeroLoss,
    BCOLoss,
    CombinedLoss,
    DiscoPOPLoss,
    DPOLoss,
    EXOLoss,
    FDPOLoss,
    NCALoss,
    PairLogps,
    SPPOHardLoss,
)

LN3 = math.log(3)


def softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def ratios(c, r) -> PairLogps:
    """Log-ratios c and r exactly: references all -10, policies c - 10 and r - 10 (float64)."""
    c, r = torch.tensor(c, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)
    ref = torch.full_like(c, -10.0)
    ones = torch.ones_like(c)
    return PairLogps(c - 10, r - 10, ref, ref.clone(), ones, ones)


def d(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- hand-computed values --------------------------------------------------------------------


def test_apo_hand_computed():
    """β = 0.5, c = (0, 2 ln 3, 0), r = (0, 0, -2 ln 3): βc = (0, ln 3, 0), βr = (0, 0, -ln 3), βh = (0, ln 3, ln 3).

    zero: 1 - σ(βc) + σ(βr) = 1 - ½ + ½, 1 - ¾ + ½, 1 - ½ + ¼ = 1, ¾, ¾.
    down: σ(βc) + 1 - σ(βh) = ½ + 1 - ½, ¾ + 1 - ¾, ½ + 1 - ¾ = 1, 1, ¾.
    """
    logps = ratios((0.0, 2 * LN3, 0.0), (0.0, 0.0, -2 * LN3))
    assert_close(APOZeroLoss(beta=0.5)(logps).losses, d(1.0, 0.75, 0.75))
    assert_close(APODownLoss(beta=0.5)(logps).losses, d(1.0, 1.0, 0.75))


def test_nca_hand_computed():
    """β = 0.5, βc = (0, ln 3, 0), βr = (0, 0, -ln 3); -logσ(βc) - ½logσ(-βc) - ½logσ(-βr):

    (0, 0): ln 2 + ½ ln 2 + ½ ln 2 = 2 ln 2;  (ln 3, 0): ln(4/3) + ½ ln 4 + ½ ln 2 = ln(4/3) + 1.5 ln 2;
    (0, -ln 3): ln 2 + ½ ln 2 + ½ ln(4/3) = 1.5 ln 2 + ½ ln(4/3).
    """
    logps = ratios((0.0, 2 * LN3, 0.0), (0.0, 0.0, -2 * LN3))
    ln2, ln43 = math.log(2), math.log(4 / 3)
    assert_close(NCALoss(beta=0.5)(logps).losses, d(2 * ln2, ln43 + 1.5 * ln2, 1.5 * ln2 + 0.5 * ln43))


def test_sppo_hard_hand_computed():
    """β = 0.5 puts the targets at ±1/(2β) = ±1: (c - 1)² + (r + 1)² for c = (0, 1, 3), r = (0, -1, 1):
    1 + 1 = 2 (= 1/(2β²) at c = r = 0), 0 + 0 = 0, 4 + 4 = 8."""
    out = SPPOHardLoss(beta=0.5)(ratios((0.0, 1.0, 3.0), (0.0, -1.0, 1.0)))
    assert_close(out.losses, d(2.0, 0.0, 8.0))


def test_exo_hand_computed():
    """β = 0.5, ε = ¼, βh = 0, ln 3, -ln 3 so q = σ(βh) = ½, ¾, ¼; KL([q, 1-q] ‖ [¾, ¼]):

    ½(ln ½ - ln ¾) + ½(ln ½ - ln ¼) = ½ ln(4/3);  ¾·0 + ¼·0 = 0 (the minimum, q = 1 - ε);
    ¼(ln ¼ - ln ¾) + ¾(ln ¾ - ln ¼) = -¼ ln 3 + ¾ ln 3 = ½ ln 3.
    """
    logps = ratios((0.0, 2 * LN3, 0.0), (0.0, 0.0, 2 * LN3))
    out = EXOLoss(beta=0.5, epsilon=0.25)(logps)
    assert_close(out.losses, d(0.5 * math.log(4 / 3), 0.0, 0.5 * LN3))


def test_discopop_hand_computed():
    """β = 0.5, h = 0, 2, -2 so x = βh = 0, 1, -1; τ = 1/ln 3 makes σ(x/τ) = ½, ¾, ¼:

    (1 - σ)·softplus(-x) + σ·e^(-x) = ½ ln 2 + ½, ¼ softplus(-1) + ¾ e⁻¹, ¾ softplus(1) + ¼ e.
    """
    out = DiscoPOPLoss(beta=0.5, tau=1 / LN3)(ratios((0.0, 2.0, 0.0), (0.0, 0.0, 2.0)))
    expected = d(0.5 * math.log(2) + 0.5, 0.25 * softplus(-1) + 0.75 / math.e, 0.75 * softplus(1) + 0.25 * math.e)
    assert_close(out.losses, expected)


def test_discopop_default_tau_switches_and_stays_finite():
    """τ = 0.05: x = ±2 is far into either branch (σ(±40)), so e⁻² and softplus(2); x = -200 must give
    softplus(200) = 200, not e^200·σ(-4000) = inf·0 = nan, in float32 too, with a finite gradient."""
    out = DiscoPOPLoss(beta=1.0)(ratios((2.0, 0.0), (0.0, 2.0)))
    assert_close(out.losses, d(math.exp(-2), softplus(2)))
    c = torch.tensor([-200.0], requires_grad=True)
    ref = torch.zeros(1)
    loss = DiscoPOPLoss(beta=1.0)(PairLogps(c, ref, ref, ref, torch.ones(1), torch.ones(1))).loss
    loss.backward()
    assert_close(loss, torch.tensor(200.0))
    assert torch.isfinite(c.grad).all()


def test_bco_hand_computed_at_zero_shift():
    """δ = 0 (fresh, eval mode): -logσ(βc) - logσ(-βr) = 2 ln 2 at c = r = 0; βc = ln 3, βr = -ln 3:
    2·ln(4/3)."""
    loss = BCOLoss(beta=0.5).eval()
    out = loss(ratios((0.0, 2 * LN3), (0.0, -2 * LN3)))
    assert_close(out.losses, d(2 * math.log(2), 2 * math.log(4 / 3)))


def test_fdpo_hand_computed():
    """Scores f'(u) of the log-ratio l = log u, constants dropped; loss softplus(-β·(s_c - s_r)):

    forward KL, -1/u: c = ln 2, r = 0 → -½ + 1 = ½; β = 2 → softplus(-1).
    JS, log σ(l): c = ln 3, r = -ln 3 → ln ¾ - ln ¼ = ln 3; β = 1 → -logσ(ln 3) = ln(4/3).
    α = ½, -u^(-½)/½: c = ln 4, r = 0 → -1 + 2 = 1; β = 1 → softplus(-1).
    All at c = r = 0: ln 2.
    """
    sp1 = softplus(-1)
    forward = FDPOLoss(beta=2.0, divergence="forward_kl")(ratios((math.log(2), 0.0), (0.0, 0.0)))
    js = FDPOLoss(beta=1.0, divergence="js")(ratios((LN3, 0.0), (-LN3, 0.0)))
    alpha = FDPOLoss(beta=1.0, divergence="alpha", alpha=0.5)(ratios((math.log(4), 0.0), (0.0, 0.0)))
    assert_close(forward.losses, d(sp1, math.log(2)))
    assert_close(js.losses, d(math.log(4 / 3), math.log(2)))
    assert_close(alpha.losses, d(sp1, math.log(2)))


def test_fdpo_reverse_kl_is_dpo_and_forward_kl_stays_finite():
    logps = random_pair()
    assert_close(FDPOLoss(beta=0.3)(logps).losses, DPOLoss(beta=0.3)(logps).losses)
    c = torch.tensor([-500.0, -5.0], requires_grad=True)  # the policy far below the reference
    ref = torch.zeros(2)
    out = FDPOLoss(beta=0.1, divergence="forward_kl")(PairLogps(c, ref, ref, ref, torch.ones(2), torch.ones(2)))
    out.loss.backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(c.grad).all()


# --- AOT: sorting semantics ------------------------------------------------------------------


def test_aot_pair_sorts_chosen_and_rejected_separately():
    """c = (3, 1, 2), r = (0, 5, 1): sorted c = (1, 2, 3), sorted r = (0, 1, 5), differences
    (1, 1, -2); β = 1: softplus(-1), softplus(-1), softplus(2). Per example h = (3, -4, 1) would
    give other values. Rewards stay per example, unsorted; permuting the batch permutes nothing."""
    logps = ratios((3.0, 1.0, 2.0), (0.0, 5.0, 1.0))
    out = AOTPairLoss(beta=1.0)(logps)
    assert_close(out.losses, d(softplus(-1), softplus(-1), softplus(2)))
    assert_close(out.chosen_rewards, d(3.0, 1.0, 2.0))
    assert_close(out.margins, d(3.0, -4.0, 1.0))
    shuffled = ratios((2.0, 3.0, 1.0), (5.0, 1.0, 0.0))
    assert_close(AOTPairLoss(beta=1.0)(shuffled).losses, out.losses)


def test_aot_sorts_policy_and_reference_gaps():
    """Policy gaps u = π_c - π_r = (2, -1, 0), reference gaps v = (0, 3, -2): sorted (-1, 0, 2) and
    (-2, 0, 3), differences (1, 0, -1); β = 1: softplus(-1), ln 2, softplus(1). Per example
    h = u - v = (2, -4, 2). Re-pairing chosen with other rejected completions changes nothing as
    long as each gap distribution is the same."""
    zeros = torch.zeros(3, dtype=torch.float64)
    ones = torch.ones(3)
    logps = PairLogps(zeros, -d(2.0, -1.0, 0.0), zeros, -d(0.0, 3.0, -2.0), ones, ones)
    out = AOTLoss(beta=1.0)(logps)
    assert_close(out.losses, d(softplus(-1), math.log(2), softplus(1)))
    assert_close(out.margins, d(2.0, -4.0, 2.0))
    moved = PairLogps(zeros, -d(0.0, 2.0, -1.0), zeros, -d(3.0, -2.0, 0.0), ones, ones)
    assert_close(AOTLoss(beta=1.0)(moved).losses, out.losses)
    assert not AOTLoss.per_example and not AOTPairLoss.per_example and DPOLoss.per_example


# --- BCO: the running reward shift δ ---------------------------------------------------------


def test_bco_delta_updates_in_training_only_and_is_saved():
    """β = 0.5. Batch 1: c = (2, 0), r = (0, -2), rewards (1, 0, 0, -1), mean 0 → δ = 0.
    Batch 2: c = (4, 2), r = (2, 0), rewards (2, 1, 1, 0), mean 1 → δ = (0 + 1)/2 = ½, used at once:
    softplus(-(2 - ½)) + softplus(1 - ½), softplus(-(1 - ½)) + softplus(0 - ½)."""
    loss = BCOLoss(beta=0.5)
    assert loss.training
    out1 = loss(ratios((2.0, 0.0), (0.0, -2.0)))
    assert_close(out1.metrics["bco_delta"], torch.tensor(0.0))
    out2 = loss(ratios((4.0, 2.0), (2.0, 0.0)))
    assert_close(loss.delta, torch.tensor(0.5))
    assert int(loss.steps) == 2
    assert_close(out2.losses, d(softplus(-1.5) + softplus(0.5), 2 * softplus(-0.5)))
    loss.eval()
    out3 = loss(ratios((10.0, 10.0), (10.0, 10.0)))  # would move δ if it were training
    assert_close(loss.delta, torch.tensor(0.5))
    assert_close(out3.metrics["bco_delta"], torch.tensor(0.5))
    state = loss.state_dict()
    assert set(state) == {"delta", "steps"}
    restored = BCOLoss(beta=0.5)
    restored.load_state_dict(state)
    assert_close(restored.delta, torch.tensor(0.5))
    assert int(restored.steps) == 2
    assert {"parts.0.delta", "parts.0.steps"} <= set(CombinedLoss([BCOLoss()]).state_dict())


def test_bco_gradient_does_not_flow_into_delta():
    logps = ratios((1.0, 2.0), (0.0, -1.0))
    logps.policy_chosen.requires_grad_(True)
    loss = BCOLoss(beta=0.5)
    loss(logps).loss.backward()
    assert not loss.delta.requires_grad and logps.policy_chosen.grad is not None


# --- independent formulas on random inputs ---------------------------------------------------


def _on_ratios(fn):
    """A per-element formula of (c, r) from one of (pc, pr, rc, rr, ct, rt)."""
    return lambda pc, pr, rc, rr, ct, rt: fn(pc - rc, pr - rr)


def _fdpo(score, b):
    return _on_ratios(lambda c, r: -log_sigmoid(b * (score(c) - score(r))))


def _exo(b, eps):
    def f(c, r):
        q = sigmoid(b * (c - r))
        return q * math.log(q / (1 - eps)) + (1 - q) * math.log((1 - q) / eps)

    return _on_ratios(f)


def _discopop(b, tau):
    def f(c, r):
        x = b * (c - r)
        return (1 - sigmoid(x / tau)) * softplus(-x) + sigmoid(x / tau) * math.exp(-x)

    return _on_ratios(f)


@pytest.mark.parametrize(
    "loss, formula",
    [
        (APOZeroLoss(beta=0.2), _on_ratios(lambda c, r: 1 - sigmoid(0.2 * c) + sigmoid(0.2 * r))),
        (APODownLoss(beta=0.2), _on_ratios(lambda c, r: sigmoid(0.2 * c) + 1 - sigmoid(0.2 * (c - r)))),
        (
            NCALoss(beta=0.2),
            _on_ratios(lambda c, r: -log_sigmoid(0.2 * c) - 0.5 * log_sigmoid(-0.2 * c) - 0.5 * log_sigmoid(-0.2 * r)),
        ),
        (EXOLoss(beta=0.1, epsilon=1e-3), _exo(0.1, 1e-3)),
        (SPPOHardLoss(beta=0.3), _on_ratios(lambda c, r: (c - 0.5 / 0.3) ** 2 + (r + 0.5 / 0.3) ** 2)),
        (DiscoPOPLoss(beta=0.1, tau=0.05), _discopop(0.1, 0.05)),
        (DiscoPOPLoss(beta=0.2, tau=2.0), _discopop(0.2, 2.0)),
        (BCOLoss(beta=0.2).eval(), _on_ratios(lambda c, r: -log_sigmoid(0.2 * c) - log_sigmoid(-0.2 * r))),
        (FDPOLoss(beta=0.1, divergence="forward_kl"), _fdpo(lambda x: -1 / math.exp(x), 0.1)),
        (FDPOLoss(beta=0.1, divergence="js"), _fdpo(lambda x: math.log(2 * math.exp(x) / (1 + math.exp(x))), 0.1)),
        (FDPOLoss(beta=0.1, divergence="alpha", alpha=0.3), _fdpo(lambda x: (1 - math.exp(x) ** -0.3) / 0.3, 0.1)),
    ],
    ids=["apo_zero", "apo_down", "nca", "exo", "sppo_hard", "discopop", "discopop_tau2", "bco", "fdpo_fkl",
         "fdpo_js", "fdpo_alpha"],
)
def test_against_independent_formula(loss, formula):
    logps = random_pair(seed=3)
    if isinstance(loss, FDPOLoss):  # 1/u at log-ratios near -40 is ~1e17: random log-ratios in (-2, 2)
        logps.ref_chosen = logps.policy_chosen + logps.ref_chosen / 10 + 2
        logps.ref_rejected = logps.policy_rejected + logps.ref_rejected / 10 + 2
    expected = per_element(formula, logps)
    out = loss(logps)
    assert_close(out.losses, expected)
    assert_close(out.loss, expected.mean())
    c, r = logps.policy_chosen - logps.ref_chosen, logps.policy_rejected - logps.ref_rejected
    assert_close(out.chosen_rewards, loss.beta * c)
    assert_close(out.margins, loss.beta * (c - r))
    assert_close(out.accuracies, (c > r).to(out.accuracies.dtype))
    assert out.chosen_rewards.grad_fn is None


def test_bco_against_independent_formula_with_shift():
    """Two training batches: δ is the mean of their mean rewards, and the second batch uses it."""
    first, second = random_pair(seed=4), random_pair(seed=5)
    loss = BCOLoss(beta=0.2)
    loss(first)
    out = loss(second)
    means = [0.2 * sum(p - q for p, q in zip(x.policy_chosen.tolist() + x.policy_rejected.tolist(),
                                            x.ref_chosen.tolist() + x.ref_rejected.tolist())) / 32
             for x in (first, second)]
    delta = sum(means) / 2
    assert_close(loss.delta, torch.tensor(delta, dtype=torch.float32))
    d32 = float(loss.delta)  # the buffer is float32; the formula uses its value
    expected = per_element(_on_ratios(lambda c, r: -log_sigmoid(0.2 * c - d32) - log_sigmoid(-(0.2 * r - d32))), second)
    assert_close(out.losses, expected)


def test_aot_against_independent_formula():
    logps = random_pair(seed=6)
    pc, pr, rc, rr = (getattr(logps, n).tolist() for n in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"))
    u, v = sorted(a - b for a, b in zip(pc, pr)), sorted(a - b for a, b in zip(rc, rr))
    assert_close(AOTLoss(beta=0.1)(logps).losses, d(*(-log_sigmoid(0.1 * (a - b)) for a, b in zip(u, v))))
    c, r = sorted(a - b for a, b in zip(pc, rc)), sorted(a - b for a, b in zip(pr, rr))
    assert_close(AOTPairLoss(beta=0.1)(logps).losses, d(*(-log_sigmoid(0.1 * (a - b)) for a, b in zip(c, r))))


# --- validation and flags --------------------------------------------------------------------

FAMILY = [APOZeroLoss, APODownLoss, NCALoss, EXOLoss, SPPOHardLoss, AOTLoss, AOTPairLoss, DiscoPOPLoss, BCOLoss, FDPOLoss]


@pytest.mark.parametrize("cls", FAMILY, ids=lambda c: c.__name__)
def test_needs_reference_and_validates_beta(cls):
    assert cls.needs_reference and cls.data_mode == "paired"
    logps = ratios((0.0,), (0.0,))
    logps.ref_chosen = logps.ref_rejected = None
    with pytest.raises(ValueError, match=f"{cls.__name__} needs reference log-probs"):
        cls()(logps)
    with pytest.raises(ConfigError, match=rf"^model.loss.init_args.beta: {cls.__name__}'s beta must be > 0"):
        cls(beta=0.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: EXOLoss(epsilon=0.0),
        lambda: EXOLoss(epsilon=0.5),
        lambda: DiscoPOPLoss(tau=0.0),
        lambda: FDPOLoss(divergence="chi2"),
        lambda: FDPOLoss(divergence="alpha", alpha=1.0),
    ],
)
def test_bad_hyper_parameters_raise(make):
    with pytest.raises(ValueError):
        make()
