"""Preference-optimisation losses: pure functions over log-prob tensors plus thin modules.

Each loss class holds only hyper-parameters; ``loss.gather(...)`` turns the per-row
log-probs of one concatenated forward pass into a container and ``loss(container)``
returns a :class:`LossOutput`. Choose one in YAML with ``class_path``.
"""

from .base import LossOutput, PairLogps, PreferenceLoss, UnpairedLogps, average, pairwise_output
from .combined import CombinedLoss
from .dpo import DPOLoss, RobustDPOLoss, dpo_loss, robust_dpo_loss
from .hinge import HingeLoss, hinge_loss
from .ipo import IPOLoss, ipo_loss
from .kto import KTOLoss, kto_loss, kto_reference_point
from .orpo import ORPOLoss, log1mexp, orpo_log_odds, orpo_loss
from .sft import SFTLoss, sft_loss
from .simpo import SimPOLoss, simpo_loss

__all__ = [
    "CombinedLoss",
    "DPOLoss",
    "HingeLoss",
    "IPOLoss",
    "KTOLoss",
    "LossOutput",
    "ORPOLoss",
    "PairLogps",
    "PreferenceLoss",
    "RobustDPOLoss",
    "SFTLoss",
    "SimPOLoss",
    "UnpairedLogps",
    "average",
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_loss",
    "kto_reference_point",
    "log1mexp",
    "orpo_log_odds",
    "orpo_loss",
    "pairwise_output",
    "robust_dpo_loss",
    "sft_loss",
    "simpo_loss",
]
