"""The classic RLHF baseline: SFT, a reward model trained on pairs, PPO with a KL penalty."""

from dpo_lit.rlhf.objectives import KLController, gae
from dpo_lit.rlhf.ppo import PPOModule
from dpo_lit.rlhf.reward_model import RewardModule

__all__ = ["KLController", "PPOModule", "RewardModule", "gae"]
