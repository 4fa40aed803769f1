"""Rewards: VADER's sign on obvious sentences, length-rule values worked out by hand, imports."""

from __future__ import annotations

import pytest
import torch

from dpo_lit.rewards import CallableReward, ContainsReward, LengthReward, RegexReward, Reward, VaderSentiment
from dpo_lit.rewards.rules import repeated_fraction


def word_count(prompts: list[str], completions: list[str]) -> list[float]:
    """A plain function for CallableReward to import."""
    return [float(len(c.split())) for c in completions]


def cut_flag(prompts: list[str], completions: list[str], finished: list[bool] | None = None) -> list[float]:
    return [0.0 if f else 1.0 for f in finished]


def test_vader_scores_obvious_sentences_by_sign() -> None:
    texts = ["I love this, it is wonderful and makes me so happy!", "This is terrible, I hate it.", ""]
    compound = VaderSentiment()(["p"] * 3, texts)
    assert compound.dtype == torch.float32 and compound.shape == (3,)
    assert compound[0] > 0.5 and compound[1] < -0.5 and compound[2] == 0.0
    neg = VaderSentiment("neg")(["p"] * 2, texts[:2])
    assert neg[0] == 0.0 and neg[1] > 0.3
    assert VaderSentiment().name == "vader_compound" and VaderSentiment("pos").name == "vader_pos"


def test_length_reward_values() -> None:
    reward = LengthReward(target_words=4)
    completions = ["one two three four", "one two", "a b c d e f g h", ""]
    # −|words − 4| / 4: 0, −0.5, −1, −1
    torch.testing.assert_close(reward(["p"] * 4, completions), torch.tensor([0.0, -0.5, -1.0, -1.0]))
    penalised = LengthReward(target_words=4, unfinished_penalty=0.25)
    torch.testing.assert_close(
        penalised(["p"] * 2, completions[:2], finished=[True, False]), torch.tensor([0.0, -0.75])
    )
    torch.testing.assert_close(penalised(["p"], completions[:1]), torch.tensor([0.0]))  # flags unknown


def test_length_reward_repetition_penalty() -> None:
    loop = "la la la la la"  # 4 bigrams, all ("la", "la"): 3 repeat the first
    assert repeated_fraction(loop.split(), 2) == pytest.approx(0.75)
    assert repeated_fraction(["a", "b", "c"], 2) == 0.0 and repeated_fraction(["a"], 3) == 0.0
    reward = LengthReward(target_words=5, repetition_penalty=2.0, ngram=2)  # length term 0
    torch.testing.assert_close(reward(["p"], [loop]), torch.tensor([-1.5]))


def test_regex_and_contains_rewards() -> None:
    completions = ["The answer is 42.", "No idea", "ANSWER: yes"]
    torch.testing.assert_close(
        RegexReward(r"answer\W+\w+", reward=2.0)(["p"] * 3, completions), torch.tensor([2.0, 0.0, 0.0])
    )
    torch.testing.assert_close(
        RegexReward(r"answer\W+\w+", ignore_case=True)(["p"] * 3, completions), torch.tensor([1.0, 0.0, 1.0])
    )
    torch.testing.assert_close(
        RegexReward(r"No \w+", full_match=True)(["p"] * 3, completions), torch.tensor([0.0, 1.0, 0.0])
    )
    contains = ContainsReward("answer: (")
    torch.testing.assert_close(contains(["p"] * 2, ["Answer: (b)", "answer b"]), torch.tensor([1.0, 0.0]))


def test_callable_reward_imports_a_dotted_path() -> None:
    reward = CallableReward("test_rewards.word_count")
    torch.testing.assert_close(reward(["p", "p"], ["a b c", ""]), torch.tensor([3.0, 0.0]))
    assert reward.name == "word_count"
    with_flags = CallableReward("test_rewards:cut_flag")
    torch.testing.assert_close(with_flags(["p", "p"], ["a", "b"], [True, False]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="no attribute"):
        CallableReward("test_rewards.missing")
    with pytest.raises(ValueError, match="cannot import"):
        CallableReward("no_such_module.fn")


def test_a_subclass_is_checked_for_one_score_per_completion() -> None:
    class Broken(Reward):
        def score(self, prompts, completions, finished):
            return [1.0]

    assert Broken().name == "broken"
    with pytest.raises(ValueError, match="expected 2 scores"):
        Broken()(["p", "p"], ["a", "b"])
    with pytest.raises(ValueError, match="2 prompts, 1 completions"):
        LengthReward()(["p", "p"], ["a"])
