"""AOT: alignment via optimal transport, a DPO-style loss on sorted (quantile-matched) log-ratios."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LossOutput, PairLogps, PreferenceLoss, check_beta, log_ratio_output


def aot_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """Per-quantile AOT (paired) loss (B,): ``softplus(-β·(sort(π_c - π_r) - sort(ref_c - ref_r)))``.

    The policy's and the reference's chosen-minus-rejected log-prob gaps are sorted separately
    across the batch; entry i compares their i-th smallest values, not example i.
    """
    policy_sorted = torch.sort(policy_chosen - policy_rejected).values
    ref_sorted = torch.sort(ref_chosen - ref_rejected).values
    return -F.logsigmoid(beta * (policy_sorted - ref_sorted))


def aot_pair_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """Per-quantile AOT (unpaired) loss (B,): ``softplus(-β·(sort(c) - sort(r)))``.

    c and r are the chosen and rejected log-ratios, sorted separately across the batch; entry i
    compares the i-th smallest chosen log-ratio with the i-th smallest rejected one.
    """
    chosen_sorted = torch.sort(policy_chosen - ref_chosen).values
    rejected_sorted = torch.sort(policy_rejected - ref_rejected).values
    return -F.logsigmoid(beta * (chosen_sorted - rejected_sorted))


class AOTLoss(PreferenceLoss):
    """Alignment via Optimal Transport, paired (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882).

    AOT asks for first-order stochastic dominance of one distribution over another rather
    than a margin per example. For a batch of B sorted samples the optimal-transport plan in
    one dimension matches quantiles, so the loss is a smooth penalty on sorted differences
    (the paper's relaxation with the logistic loss)::

        L = (1/B)·Σ_i -log σ(β·(u_(i) - v_(i))),
        u = log π(y_w|x) - log π(y_l|x),   v = log π_ref(y_w|x) - log π_ref(y_l|x)

    where ``u_(i)`` is the i-th smallest u in the batch (the paper's paired variant: the policy's
    chosen-over-rejected gap should dominate the reference's). ``losses`` holds the B per-quantile
    terms, NOT per-example losses: entry i does not belong to example i, and the value depends on
    the whole (micro-)batch, so larger batches approximate the distributions better. TRL's
    ``aot`` additionally offers label smoothing; not included. Rewards are
    ``β·(log π - log π_ref)`` per example, unsorted, detached.

    Args:
        beta: Scale β of the sorted differences. Must be > 0.
    """

    needs_reference = True
    per_example = False  # losses are per quantile of the batch
    _per_quantile = staticmethod(aot_loss)

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        check_beta(type(self).__name__, beta)
        self.beta = beta

    def forward(self, logps: PairLogps) -> LossOutput:
        return log_ratio_output(logps, type(self).__name__, self.beta, self._per_quantile)


class AOTPairLoss(AOTLoss):
    """Alignment via Optimal Transport, unpaired (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882).

    The paper's unpaired variant: the distribution of chosen log-ratios should dominate that of
    rejected log-ratios, so the two are sorted *separately* across the batch (pairs are not
    used)::

        L = (1/B)·Σ_i -log σ(β·(c_(i) - r_(i))),   c = log π(y_w|x)/π_ref(y_w|x),  r likewise for y_l

    (TRL's ``aot_unpaired``, earlier ``aot_pair``.) ``losses`` are per quantile, as in
    :class:`AOTLoss`; rewards are ``β·(log π - log π_ref)`` per example, unsorted.

    Args:
        beta: Scale β of the sorted differences. Must be > 0.
    """

    _per_quantile = staticmethod(aot_pair_loss)
