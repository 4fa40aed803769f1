"""Rewards: VADER's sign on obvious sentences, length-rule values worked out by hand, imports, and
a reward model scoring a conversation as it was trained on it."""

from __future__ import annotations

import json

import pytest
import torch

from dpo_lit.callbacks.reward_kl import sample_and_score
from dpo_lit.data.prompts import encode_prompts
from dpo_lit.models import TINY_ALIAS, load_model
from dpo_lit.rewards import CallableReward, ContainsReward, LengthReward, RegexReward, Reward, VaderSentiment
from dpo_lit.rewards.rules import repeated_fraction
from dpo_lit.rlhf.ppo import PPOModule
from dpo_lit.sampling.measure import score_samples
from dpo_lit.sampling.predict import GenerationModule, PromptDataModule
from dpo_lit.sampling.sample import sample


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


# A Llama-3-like template: it trims every message's content, so the assistant's answer that a reward
# model is trained on is not the answer's raw tokens.
TRIMMING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] | trim + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "I want a snack."},
    {"role": "assistant", "content": "An egg, perhaps?"},
    {"role": "user", "content": "How do I boil an egg?"},
]


@pytest.mark.parametrize("template", ["own", "trimming"])
def test_reward_model_scores_the_whole_conversation_as_trained(tmp_path, template: str) -> None:
    """RewardModel's score of (conversation, completion) is the trained head's output on the very
    rows RewardModule trains on: PreferenceDataModule's batch of the same conversational record."""
    from transformers import AutoTokenizer

    from dpo_lit.data import PreferenceDataModule
    from dpo_lit.models import TINY_ALIAS, resolve
    from dpo_lit.rewards import RewardModel
    from dpo_lit.rlhf.reward_model import load_reward_model, sequence_rewards

    torch.manual_seed(0)
    model = load_reward_model(TINY_ALIAS)  # random backbone and head
    tokenizer = AutoTokenizer.from_pretrained(resolve(TINY_ALIAS))  # a copy: the shared one stays as is
    if template == "trimming":
        tokenizer.chat_template = TRIMMING_TEMPLATE
    export = tmp_path / "reward"
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    chosen, rejected = "Put it in boiling water for nine minutes.", " No. Look it up.\n"
    record = {"prompt": CONVERSATION, "chosen": [{"role": "assistant", "content": chosen}],
              "rejected": [{"role": "assistant", "content": rejected}]}  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text(json.dumps(record) + "\n")
    data = PreferenceDataModule(str(export), train_files=[str(tmp_path / "pairs.jsonl")], val_fraction=0.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))  # rows: prompt + chosen, prompt + rejected
    with torch.no_grad():
        trained_view = sequence_rewards(model.eval(), batch["input_ids"], batch["attention_mask"])

    reward = RewardModel(str(export))
    scores = reward([CONVERSATION] * 2, [chosen, rejected], [True, True])
    torch.testing.assert_close(scores, trained_view)
    # The conversation matters: its last message alone is another input with another score.
    alone = reward([CONVERSATION[-1]["content"]] * 2, [chosen, rejected], [True, True])
    assert (alone - scores).abs().min() > 1e-4


def test_text_rewards_read_a_conversation_as_its_last_message() -> None:
    reward = CallableReward("test_rewards.prompt_words")
    torch.testing.assert_close(reward([CONVERSATION, "a b"], ["x", "y"]), torch.tensor([6.0, 2.0]))


def prompt_words(prompts: list[str], completions: list[str]) -> list[float]:
    """A text reward that reads the prompt (a string: the base class reduces conversations)."""
    return [float(len(p.split())) for p in prompts]


class ConversationLength(Reward):
    """Reads conversations whole, as RewardModel does: the number of messages of each prompt."""

    reads_conversations = True

    def score(self, prompts, completions, finished):
        return [float(len(p)) if isinstance(p, list) else 0.0 for p in prompts]


def test_held_out_scoring_hands_a_reward_the_whole_conversation(tiny_tokenizer) -> None:
    """The on-policy comparison and HeldoutRewardKL pass each prompt to the reward as it is: a
    three-message conversation arrives with its three messages, not as its last message's text."""
    model = load_model(TINY_ALIAS)
    talk = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"}]  # fmt: skip
    prompts = [talk, "Plain text"]
    ids = encode_prompts(tiny_tokenizer, prompts)
    scored = sample_and_score(model, model, None, tiny_tokenizer, prompts, ids, ConversationLength(), 2, 4, 8, seed=0)
    assert [s.reward for s in scored] == [3.0, 3.0, 0.0, 0.0]
    samples = sample(model, tiny_tokenizer, ids, 1, 4, seed=0)
    assert score_samples(ConversationLength(), prompts, samples).tolist() == [3.0, 0.0]


def test_predict_and_ppo_rollouts_hand_a_reward_the_whole_conversation(tmp_path) -> None:
    """predict's scoring of its samples and PPO's rollouts pass each prompt of a prompts file to the
    reward as it is: a three-message conversation arrives with its three messages (they passed its
    last message's text, so a reward model scored another input than it was trained on)."""
    talk = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"}]  # fmt: skip
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (talk, "Plain text")))
    data = PromptDataModule(TINY_ALIAS, str(path), batch_size=2)
    data.setup("predict")
    batch = data.collate(data.items)
    generation = GenerationModule(TINY_ALIAS, reward=ConversationLength(), num_samples=2, max_new_tokens=4)
    assert [r.scores for r in generation.predict_step(batch, 0)["prompts"]] == [[3.0, 3.0], [0.0, 0.0]]
    ppo = PPOModule(TINY_ALIAS, reward=ConversationLength(), samples_per_prompt=2, max_new_tokens=4)
    rollouts = ppo.rollouts(batch, seed=0)
    by_prompt = [(s.prompt_index, score) for s, score in zip(rollouts.samples, rollouts.scores.tolist())]
    assert by_prompt == [(0, 3.0), (0, 3.0), (1, 0.0), (1, 0.0)]
