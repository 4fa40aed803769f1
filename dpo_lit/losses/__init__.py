"""Preference-optimisation losses: pure functions over log-prob tensors plus thin modules.

Each loss class holds only hyper-parameters (and BCOLoss its running reward mean, a buffer);
``loss.logps_from_rows(...)`` turns the per-row log-probs of one concatenated forward pass into a
container and ``loss(container)`` returns a :class:`LossOutput`. WPOLoss and LDDPOLoss wrap any
pairwise loss. Choose one in YAML with ``class_path``; ``configs/loss/`` has a fragment for each.
"""

from .aot import AOTLoss, AOTPairLoss, aot_loss, aot_pair_loss
from .apo import APODownLoss, APOZeroLoss, apo_down_loss, apo_zero_loss
from .base import LossOutput, PairLogps, PreferenceLoss, UnpairedLogps, average, pairwise_output
from .bco import BCOLoss, bco_loss
from .combined import CombinedLoss
from .discopop import DiscoPOPLoss, discopop_loss
from .dpo import DPOLoss, RobustDPOLoss, dpo_loss, robust_dpo_loss
from .exo import EXOLoss, exo_loss
from .fdpo import FDPOLoss, fdpo_loss
from .hinge import HingeLoss, hinge_loss
from .ipo import IPOLoss, ipo_loss
from .kto import KTOLoss, kto_loss, kto_reference_point
from .nca import NCALoss, nca_loss
from .orpo import ORPOLoss, log1mexp, orpo_log_odds, orpo_loss
from .sft import SFTLoss, sft_loss
from .simpo import SimPOLoss, simpo_loss
from .sppo import SPPOHardLoss, sppo_hard_loss
from .weighting import LDDPOLoss, WPOLoss, wpo_weights

__all__ = [
    "AOTLoss",
    "AOTPairLoss",
    "APODownLoss",
    "APOZeroLoss",
    "BCOLoss",
    "CombinedLoss",
    "DPOLoss",
    "DiscoPOPLoss",
    "EXOLoss",
    "FDPOLoss",
    "HingeLoss",
    "IPOLoss",
    "KTOLoss",
    "LDDPOLoss",
    "LossOutput",
    "NCALoss",
    "ORPOLoss",
    "PairLogps",
    "PreferenceLoss",
    "RobustDPOLoss",
    "SFTLoss",
    "SPPOHardLoss",
    "SimPOLoss",
    "UnpairedLogps",
    "WPOLoss",
    "aot_loss",
    "aot_pair_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "average",
    "bco_loss",
    "discopop_loss",
    "dpo_loss",
    "exo_loss",
    "fdpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_loss",
    "kto_reference_point",
    "log1mexp",
    "nca_loss",
    "orpo_log_odds",
    "orpo_loss",
    "pairwise_output",
    "robust_dpo_loss",
    "sft_loss",
    "simpo_loss",
    "sppo_hard_loss",
    "wpo_weights",
]
