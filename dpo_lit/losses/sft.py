"""Supervised fine-tuning on the chosen completions of a preference data set."""

from __future__ import annotations

from torch import Tensor

from .base import LossOutput, PairLogps, PreferenceLoss, average, pairwise_output


def sft_loss(policy_chosen: Tensor, chosen_tokens: Tensor) -> Tensor:
    """Per-example SFT loss (B,): mean token NLL of the chosen completion, ``-policy_chosen / tokens``."""
    return -average(policy_chosen, chosen_tokens)


class SFTLoss(PreferenceLoss):
    """Negative log-likelihood of the chosen completion, per token.

    ``L = -(1/|y_w|)·log π(y_w|x)`` per example, then averaged over the batch (a per-example
    token mean, not a token mean over the whole batch). No reference model; the rejected
    completions are ignored by the loss. Rewards are the policy's average per-token
    log-probs of the chosen and rejected completions (detached), so margins and accuracies
    still say whether SFT alone separates the pairs. Combine with a preference loss via
    :class:`CombinedLoss` (e.g. DPO + SFT as in RPO, Pang et al. 2024).
    """

    needs_reference = False

    def forward(self, logps: PairLogps) -> LossOutput:
        a_c = average(logps.policy_chosen, logps.chosen_tokens)
        a_r = average(logps.policy_rejected, logps.rejected_tokens)
        return pairwise_output(sft_loss(logps.policy_chosen, logps.chosen_tokens), a_c, a_r)
