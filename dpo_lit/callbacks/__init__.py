"""Lightning callbacks: export, monitoring and evaluation. The module computes; these log and save."""

from dpo_lit.callbacks.capability import CapabilityEval
from dpo_lit.callbacks.export import ExportPretrained

__all__ = ["CapabilityEval", "ExportPretrained"]
