"""The classic RLHF baseline and the online family on the same CLI as DPO: SFT, a reward model
trained on pairs, PPO, RLOO, GRPO and online DPO.

    dpo-lit fit --config configs/sft/tiny.yaml         # SFTModule: supervised fine-tuning
    dpo-lit fit --config configs/reward/tiny.yaml      # RewardModule: Bradley-Terry on pairs
    dpo-lit fit --config configs/ppo/tiny.yaml         # PPOModule: rollouts, KL penalty, GAE, clipping
    dpo-lit fit --config configs/rloo/tiny.yaml        # RLOOModule: leave-one-out REINFORCE
    dpo-lit fit --config configs/grpo/tiny.yaml        # GRPOModule: group-normalised, clipped, KL term
    dpo-lit fit --config configs/online_dpo/tiny.yaml  # OnlineDPOModule: judged pairs of rollouts, any loss
    dpo-lit compare --config configs/compare/tiny.yaml   # every method at one budget, measured

The online methods share one base (:class:`~dpo_lit.rlhf.online.OnlineModule`: rollouts, scoring,
the reference, the update and the held-out measurement) and differ only in their training step.

Each stage is a LightningModule picked by the config's ``model.class_path``; each exports its model
with ``save_pretrained`` for the next stage (``model_name`` of the next config, or
:class:`dpo_lit.rewards.RewardModel` for the reward model).
"""

from dpo_lit.rlhf.grpo import GRPOModule
from dpo_lit.rlhf.objectives import KLController, gae
from dpo_lit.rlhf.online import OnlineModule
from dpo_lit.rlhf.online_dpo import OnlineDPOModule
from dpo_lit.rlhf.ppo import PPOModule
from dpo_lit.rlhf.reward_model import RewardModule
from dpo_lit.rlhf.rloo import RLOOModule
from dpo_lit.rlhf.sft import SFTModule

__all__ = ["GRPOModule", "KLController", "OnlineDPOModule", "OnlineModule", "PPOModule", "RLOOModule", "RewardModule",
           "SFTModule", "gae"]
