"""Containers for log-probs and loss outputs, and the base class every loss derives from.

A loss never sees a model: the LightningModule runs one concatenated forward pass, calls
``logps = loss.logps_from_rows(...)`` to split the per-row log-probs into a container, then
``out = loss(logps)``. The module never branches on the loss type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from dpo_lit.errors import ConfigError
from dpo_lit.logps import LogpsOptions

# Where a loss's arguments sit in a run's config: the prefix of a bad value's key in its error.
KEY = "model.loss.init_args."


@dataclass
class PairLogps:
    """Summed completion log-probs of a paired batch, all of shape (B,).

    ``ref_*`` are None for reference-free training; token counts may be float or long. With
    LD-DPO the sums are the desensitised ones (see :class:`~dpo_lit.logps.LogpsOptions`).
    ``aligned_*`` are the policy's WPO aligned log-probs ``Σ_t [log π(y_t|·) - log Σ_v π(v|·)²]``
    (detached), present only when the loss asked for them (``LogpsOptions.aligned``).
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    aligned_chosen: Tensor | None = None
    aligned_rejected: Tensor | None = None

    def logp_metrics(self) -> dict[str, Tensor]:
        """Per-example policy log-probs to log as ``logps/chosen`` and ``logps/rejected``."""
        return {"logps/chosen": self.policy_chosen.detach(), "logps/rejected": self.policy_rejected.detach()}


@dataclass
class UnpairedLogps:
    """Summed completion log-probs of an unpaired (KTO) batch, all of shape (B,).

    ``policy_kl``/``ref_kl`` are the log-probs of *mismatched* prompt/completion pairs
    (completion of example i-1 after the prompt of example i), used to estimate KL.
    ``label`` is True for desirable examples.
    """

    policy: Tensor
    ref: Tensor | None
    tokens: Tensor
    label: Tensor
    policy_kl: Tensor
    ref_kl: Tensor | None

    def logp_metrics(self) -> dict[str, Tensor]:
        """Policy log-probs of desirable (``chosen``) and undesirable (``rejected``) examples."""
        policy = self.policy.detach()
        return {"logps/chosen": policy[self.label], "logps/rejected": policy[~self.label]}


@dataclass
class LossOutput:
    """What a loss returns.

    ``loss`` is the scalar to optimise, ``losses`` the per-example terms (B,). Rewards,
    margins and accuracies are detached. For KTO, ``chosen_rewards``/``rejected_rewards``
    hold the rewards of desirable/undesirable examples (lengths may differ, may be 0) and
    ``margins``/``accuracies`` are None. ``metrics`` holds extra scalars to log.
    """

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    margins: Tensor | None = None
    accuracies: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)


def pairwise_output(
    losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, **metrics: Tensor
) -> LossOutput:
    """Build a LossOutput for a pairwise loss: mean loss, detached rewards, margins, accuracies."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return LossOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=chosen_rewards - rejected_rewards,
        accuracies=(chosen_rewards > rejected_rewards).float(),
        metrics={k: v.detach() for k, v in metrics.items()},
    )


def log_ratio_output(
    logps: PairLogps, name: str, beta: float, per_example: Callable[..., Tensor], *args: Any
) -> LossOutput:
    """Output of a loss on reference log-ratios: ``per_example(pc, pr, rc, rr, beta, *args)`` (B,)
    with rewards ``β·(log π - log π_ref)``. Raises a ValueError naming ``name`` without a reference."""
    chosen, rejected = log_ratios(logps, name)
    losses = per_example(
        logps.policy_chosen, logps.policy_rejected, logps.ref_chosen, logps.ref_rejected, beta, *args
    )
    return pairwise_output(losses, beta * chosen, beta * rejected)


def log_ratios(logps: PairLogps, name: str) -> tuple[Tensor, Tensor]:
    """Return ``(policy_chosen - ref_chosen, policy_rejected - ref_rejected)``, each (B,).

    Raises a ValueError naming the loss ``name`` when the reference log-probs are missing.
    """
    check_reference(logps, name)
    return logps.policy_chosen - logps.ref_chosen, logps.policy_rejected - logps.ref_rejected


def check_reference(logps: PairLogps, name: str) -> None:
    """Raise a ValueError naming the loss ``name`` unless ``logps`` holds reference log-probs."""
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError(reference_error(name))


def check_beta(name: str, beta: float) -> None:
    """Raise a ConfigError naming the key and the loss unless ``beta > 0``."""
    if beta <= 0:
        raise ConfigError(f"{KEY}beta: {name}'s beta must be > 0, got {beta}")


def margin(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor) -> Tensor:
    """The log-ratio difference ``h = (π_c − π_ref,c) − (π_r − π_ref,r)`` that the pairwise losses
    penalise, per example (B,)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def reference_error(name: str) -> str:
    """The one-line message raised when a loss that needs a reference gets none."""
    return f"{name} needs reference log-probs; set model.reference to copy, adapter or precomputed"


class PreferenceLoss(nn.Module, ABC):
    """Base class: holds hyper-parameters only; ``forward(logps) -> LossOutput``.

    Class attributes:
        needs_reference: whether ``forward`` needs ``ref_*`` log-probs.
        data_mode: ``"paired"`` (chosen/rejected) or ``"unpaired"`` (KTO).
        per_example: whether ``losses[i]`` belongs to example i (False for AOT's per-quantile terms).
        logps_options: what the loss asks of the log-prob computation beyond plain sums
            (:class:`~dpo_lit.logps.LogpsOptions`; None, the default, asks nothing).
    """

    needs_reference: bool = True
    data_mode: str = "paired"
    per_example: bool = True
    logps_options: LogpsOptions | None = None

    def logps_from_rows(
        self, policy_logps: Tensor, ref_logps: Tensor | None, tokens: Tensor, batch: dict[str, Any]
    ) -> PairLogps | UnpairedLogps:
        """Split per-row tensors (2B,) of a concatenated forward pass into a PairLogps.

        Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected. ``batch`` is unused here.
        """
        pc, pr = split_halves(policy_logps)
        rc, rr = split_halves(ref_logps) if ref_logps is not None else (None, None)
        ct, rt = split_halves(tokens)
        return PairLogps(pc, pr, rc, rr, ct, rt)

    @abstractmethod
    def forward(self, logps: PairLogps | UnpairedLogps) -> LossOutput:
        """Compute the loss from a container made by :meth:`logps_from_rows`."""

    def extra_repr(self) -> str:
        return ", ".join(
            f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_") and k != "training"
        )


class LogRatioLoss(PreferenceLoss):
    """A pairwise loss of the reference log-ratios whose one hyper-parameter is β.

    Subclasses set ``loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta) -> (B,)``
    and document the equation; rewards are ``β·(log π - log π_ref)``, detached.

    Args:
        beta: Scale β of the log-ratios. Must be > 0.
    """

    needs_reference = True
    loss_fn: Callable[..., Tensor]

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        check_beta(type(self).__name__, beta)
        self.beta = beta

    def forward(self, logps: PairLogps) -> LossOutput:
        return log_ratio_output(logps, type(self).__name__, self.beta, type(self).loss_fn)


def split_halves(x: Tensor) -> tuple[Tensor, Tensor]:
    """Split (2B, ...) rows into the first and second halves, (B, ...) each."""
    if x.shape[0] % 2:
        raise ValueError(f"expected an even number of rows (2B), got {x.shape[0]}")
    b = x.shape[0] // 2
    return x[:b], x[b:]


def average(logps: Tensor, tokens: Tensor) -> Tensor:
    """Average per-token log-prob: summed log-probs (B,) / token counts (B,), counts clamped to >= 1."""
    return logps / tokens.to(logps.dtype).clamp(min=1)


__all__ = [
    "LogRatioLoss",
    "LossOutput",
    "PairLogps",
    "PreferenceLoss",
    "UnpairedLogps",
    "average",
    "check_beta",
    "check_reference",
    "log_ratio_output",
    "log_ratios",
    "margin",
    "pairwise_output",
    "reference_error",
    "split_halves",
]
