"""Lightning callbacks: export, checkpoints, monitoring and evaluation. The module computes; these log and save."""

from dpo_lit.callbacks.budget import RolloutBudget
from dpo_lit.callbacks.capability import CapabilityEval
from dpo_lit.callbacks.checkpoint import EpochsFromSteps, LastCheckpoint, StepFromCheckpoint
from dpo_lit.callbacks.export import ExportPretrained
from dpo_lit.callbacks.guard import NonFiniteGuard
from dpo_lit.callbacks.health import TrainingHealth
from dpo_lit.callbacks.kl import SampledKL
from dpo_lit.callbacks.reward_kl import HeldoutRewardKL
from dpo_lit.callbacks.samples import SampleTable
from dpo_lit.callbacks.win_rate import WinRate

__all__ = [
    "CapabilityEval",
    "EpochsFromSteps",
    "ExportPretrained",
    "HeldoutRewardKL",
    "LastCheckpoint",
    "StepFromCheckpoint",
    "NonFiniteGuard",
    "RolloutBudget",
    "SampleTable",
    "SampledKL",
    "TrainingHealth",
    "WinRate",
]
