"""The classic RLHF baseline on the same CLI as DPO: SFT, a reward model trained on pairs, PPO.

    dpo-lit fit --config configs/sft/tiny.yaml         # SFTModule: supervised fine-tuning
    dpo-lit fit --config configs/reward/tiny.yaml      # RewardModule: Bradley-Terry on pairs
    dpo-lit fit --config configs/ppo/tiny.yaml         # PPOModule: rollouts, KL penalty, GAE, clipping
    dpo-lit compare --config configs/compare/everyday_vader.yaml   # DPO vs PPO, measured

Each stage is a LightningModule picked by the config's ``model.class_path``; each exports its model
with ``save_pretrained`` for the next stage (``model_name`` of the next config, or
:class:`dpo_lit.rewards.RewardModel` for the reward model).
"""

from dpo_lit.rlhf.objectives import KLController, gae
from dpo_lit.rlhf.ppo import PPOModule
from dpo_lit.rlhf.reward_model import RewardModule
from dpo_lit.rlhf.sft import SFTModule

__all__ = ["KLController", "PPOModule", "RewardModule", "SFTModule", "gae"]
