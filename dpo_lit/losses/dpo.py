"""DPO (with the cDPO label smoothing) and the provably robust variant (rDPO)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dpo_lit.errors import ConfigError

from .base import KEY, LossOutput, PairLogps, PreferenceLoss, check_beta, log_ratios, margin, pairwise_output


def _check_smoothing(name: str, label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(
            f"{KEY}label_smoothing: {name}'s label_smoothing must satisfy 0 <= label_smoothing < 0.5, got {label_smoothing}"
        )


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-example DPO loss (B,): ``-(1-ε)·logσ(βh) - ε·logσ(-βh)``.

    ``h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``; all inputs (B,).
    """
    h = margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def robust_dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> Tensor:
    """Per-example robust DPO loss (B,): ``[-(1-ε)·logσ(βh) + ε·logσ(-βh)] / (1-2ε)``."""
    h = margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


class DPOLoss(PreferenceLoss):
    """Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290).

    Eq. 7 of the paper::

        L = -log σ(β·[log π(y_w|x)/π_ref(y_w|x) - log π(y_l|x)/π_ref(y_l|x)]) = -log σ(β·h)

    With ``label_smoothing = ε > 0`` this is conservative DPO (cDPO, Mitchell 2023), which
    assumes each label is flipped with probability ε:
    ``-(1-ε)·log σ(βh) - ε·log σ(-βh)``. Rewards are the implicit ``β·(log π - log π_ref)``
    of the chosen and rejected completions (detached). Log-probs are summed over completion
    tokens, as in the paper. TRL's ``loss_type="sigmoid"`` ignores ``label_smoothing`` (it
    has no cDPO): there a nonzero ε silently trains plain DPO; here it applies.

    Args:
        beta: Inverse temperature β of the Bradley-Terry model; the strength of the implicit
            KL penalty towards the reference. Must be > 0.
        label_smoothing: cDPO flip probability ε, in [0, 0.5). 0 gives plain DPO.
    """

    needs_reference = True
    _per_example = staticmethod(dpo_loss)  # the pure function this class wraps

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__()
        check_beta(type(self).__name__, beta)
        _check_smoothing(type(self).__name__, label_smoothing)
        self.beta = beta
        self.label_smoothing = label_smoothing

    def forward(self, logps: PairLogps) -> LossOutput:
        chosen, rejected = log_ratios(logps, type(self).__name__)
        losses = self._per_example(
            logps.policy_chosen,
            logps.policy_rejected,
            logps.ref_chosen,
            logps.ref_rejected,
            self.beta,
            self.label_smoothing,
        )
        return pairwise_output(losses, self.beta * chosen, self.beta * rejected)


class RobustDPOLoss(DPOLoss):
    """Provably robust DPO (rDPO; Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409).

    Eq. 8 of the paper: an unbiased estimate of the clean-label DPO loss when each label is
    flipped with known probability ε::

        L = [-(1-ε)·log σ(βh) + ε·log σ(-βh)] / (1 - 2ε)

    Unlike cDPO, the flipped term enters with a *plus* sign, so the loss can go negative.
    At ``h = 0`` it equals ln 2 for every ε. Rewards as in :class:`DPOLoss`.

    Args:
        beta: Inverse temperature β, as in DPO. Must be > 0.
        label_smoothing: Assumed label-flip probability ε, in [0, 0.5).
    """

    _per_example = staticmethod(robust_dpo_loss)

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1) -> None:
        super().__init__(beta, label_smoothing)
