"""RLHF baseline stages: supervised fine-tuning first."""

from dpo_lit.rlhf.sft import SFTModule

__all__ = ["SFTModule"]
