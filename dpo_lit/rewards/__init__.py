"""Rewards for on-policy pairs: prompts (strings or conversations) and completions in, one float per
completion out.

- :class:`Reward` is the interface (subclass it to plug in a trained classifier or a learned
  reward model, see :mod:`dpo_lit.rewards.base`); :class:`CallableReward` imports a function;
- :class:`VaderSentiment` is a lexicon scorer; :class:`SentimentClassifier` a classifier trained
  on IMDb reviews (:func:`~dpo_lit.rewards.classifier.train_sentiment_classifier`);
- :class:`RewardModel` is a learned reward model (:class:`dpo_lit.rlhf.RewardModule`'s export);
- :class:`LengthReward`, :class:`RegexReward` and :class:`ContainsReward` are rules on form.
"""

from dpo_lit.rewards.base import CallableReward, Reward
from dpo_lit.rewards.classifier import SentimentClassifier
from dpo_lit.rewards.model import RewardModel
from dpo_lit.rewards.rules import ContainsReward, LengthReward, RegexReward
from dpo_lit.rewards.sentiment import VaderSentiment

__all__ = ["CallableReward", "ContainsReward", "LengthReward", "RegexReward", "Reward", "RewardModel", "SentimentClassifier",
           "VaderSentiment"]
