"""BCO: Binary Classifier Optimization, pairwise, with a running reward shift δ."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LossOutput, PairLogps, PreferenceLoss, check_beta, log_ratios, pairwise_output


def bco_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    delta: Tensor | float = 0.0,
) -> Tensor:
    """Per-example pairwise BCO loss (B,): ``-logσ(β·c - δ) - logσ(-(β·r - δ))``, c and r the log-ratios."""
    c, r = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(c - delta) - F.logsigmoid(-(r - delta))


class BCOLoss(PreferenceLoss):
    """Binary Classifier Optimization (Jung et al. 2024, https://arxiv.org/abs/2404.04656), pairwise.

    A binary classifier with logit ``r_θ(x, y) - δ``, ``r_θ = β·log π(y|x)/π_ref(y|x)``, trained
    to call chosen completions 1 and rejected ones 0 (the paper's BCO loss with reward shift)::

        L = -log σ(r_θ(x, y_w) - δ) - log σ(-(r_θ(x, y_l) - δ))

    δ is a running mean of the rewards: each *training* step first folds the batch's mean
    reward ``mean(β·c ∪ β·r)`` into it (``δ ← δ + (m - δ)/n`` at step n, the plain mean of the
    batch means so far, as TRL 0.x's ``bco_pair``; TRL ≥ 1.0 dropped δ), then uses it, without
    gradient. Validation reads δ without changing it (TRL 0.x also updated it while
    evaluating). δ and n are registered buffers (``delta``, ``steps``), so they are saved in and
    restored from checkpoints; under data parallelism each process keeps its own (TRL averaged
    across processes). ``metrics["bco_delta"]`` is δ. Rewards are ``β·(log π - log π_ref)``, detached.

    Args:
        beta: Scale β of the log-ratios in the rewards. Must be > 0.
    """

    needs_reference = True

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        check_beta(type(self).__name__, beta)
        self.beta = beta
        self.register_buffer("delta", torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, logps: PairLogps) -> LossOutput:
        chosen, rejected = log_ratios(logps, type(self).__name__)
        if self.training:
            self.update_delta(self.beta * torch.cat([chosen, rejected]).mean())
        losses = bco_loss(
            logps.policy_chosen, logps.policy_rejected, logps.ref_chosen, logps.ref_rejected, self.beta, self.delta
        )
        return pairwise_output(losses, self.beta * chosen, self.beta * rejected, bco_delta=self.delta.clone())

    @torch.no_grad()
    def update_delta(self, batch_mean: Tensor) -> None:
        """Fold one batch's mean reward into the running mean δ."""
        self.steps += 1
        self.delta += (batch_mean.detach().to(self.delta.dtype) - self.delta) / self.steps
