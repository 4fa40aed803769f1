"""A weighted sum of several losses over the same log-probs (e.g. DPO + SFT as in RPO)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from dpo_lit.errors import ConfigError
from dpo_lit.logps import LogpsOptions

from .base import KEY, LossOutput, PairLogps, PreferenceLoss, UnpairedLogps


class CombinedLoss(PreferenceLoss):
    """Weighted sum ``Σ_i w_i·L_i`` of several losses sharing one forward pass.

    For example RPO (Pang et al. 2024, https://arxiv.org/abs/2404.19733) is DPO plus a
    weighted NLL term on the chosen completion: ``losses=[DPOLoss(), SFTLoss()]``,
    ``weights=[1.0, 0.5]``. Needs a reference if any part does; all parts must share a
    ``data_mode``. ``losses`` (per example) and ``loss`` are the weighted sums of the parts'.
    Rewards, margins and accuracies come from the FIRST part. ``metrics`` holds each part's
    unweighted loss as ``"<name>/loss"`` (name = class name without ``Loss``, lower case,
    e.g. ``dpo/loss``, ``sft/loss``; an index is appended on repeats) and each part's own
    metrics as ``"<name>/<metric>"``. The first part arranges the rows for all, so only it may
    ask for extra log-probs (``logps_options``: a :class:`WPOLoss` or :class:`LDDPOLoss`); to
    weight or desensitise the whole sum, wrap the CombinedLoss instead.

    Args:
        losses: The losses to add up, each a ``PreferenceLoss`` (``class_path`` in YAML).
        weights: One weight per loss; all 1.0 when omitted.
    """

    def __init__(self, losses: list[PreferenceLoss], weights: list[float] | None = None) -> None:
        super().__init__()
        if not losses:
            raise ConfigError(f"{KEY}losses: CombinedLoss needs at least one loss")
        weights = [1.0] * len(losses) if weights is None else list(weights)
        if len(weights) != len(losses):
            raise ConfigError(f"{KEY}weights: CombinedLoss got {len(losses)} losses but {len(weights)} weights")
        modes = {loss.data_mode for loss in losses}
        if len(modes) > 1:
            names = ", ".join(f"{type(loss).__name__}={loss.data_mode}" for loss in losses)
            raise ConfigError(f"{KEY}losses: CombinedLoss's losses must share a data_mode, got {names}")
        if {loss.logps_options for loss in losses[1:]} - {None, losses[0].logps_options}:
            raise ValueError(
                "CombinedLoss: only its first part may ask for extra log-probs (WPOLoss, LDDPOLoss); "
                "wrap the CombinedLoss instead"
            )
        self.parts = nn.ModuleList(losses)
        self.weights = weights
        self.needs_reference = any(loss.needs_reference for loss in losses)
        self.per_example = all(loss.per_example for loss in losses)
        self.data_mode = modes.pop()
        self._names = _names(losses)

    @property
    def logps_options(self) -> LogpsOptions | None:
        """The first part's: it arranges the rows for all parts."""
        return self.parts[0].logps_options

    def logps_from_rows(
        self, policy_logps: Tensor, ref_logps: Tensor | None, tokens: Tensor, batch: dict[str, Any]
    ) -> PairLogps | UnpairedLogps:
        return self.parts[0].logps_from_rows(policy_logps, ref_logps, tokens, batch)

    def forward(self, logps: PairLogps | UnpairedLogps) -> LossOutput:
        outs = [part(logps) for part in self.parts]
        first = outs[0]
        metrics: dict[str, Tensor] = {}
        for name, out in zip(self._names, outs):
            metrics[f"{name}/loss"] = out.loss.detach()
            metrics.update({f"{name}/{k}": v for k, v in out.metrics.items()})
        return LossOutput(
            loss=sum(w * out.loss for w, out in zip(self.weights, outs)),
            losses=sum(w * out.losses for w, out in zip(self.weights, outs)),
            chosen_rewards=first.chosen_rewards,
            rejected_rewards=first.rejected_rewards,
            margins=first.margins,
            accuracies=first.accuracies,
            metrics=metrics,
        )


def _names(losses: list[PreferenceLoss]) -> list[str]:
    names: list[str] = []
    for i, loss in enumerate(losses):
        name = type(loss).__name__.removesuffix("Loss").lower() or f"loss{i}"
        names.append(f"{name}{i}" if name in names else name)
    return names
