"""Supervised fine-tuning data: which tokens carry the loss, and bad records."""

import gzip
import json
import re
from pathlib import Path

import pytest
import torch

from dpo_lit.data import DataError, SFTDataModule
from dpo_lit.data.sft import SFTCollator
from dpo_lit.models import TINY_ALIAS


def write_jsonl(path: Path, records: list[dict]) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def batch_of(path: str, **kwargs) -> tuple[dict[str, torch.Tensor], SFTDataModule]:
    """One batch of all the records of a file (nothing held out), in file order, and the data module."""
    data = SFTDataModule(TINY_ALIAS, [path], val_fraction=0.0, **kwargs)
    data.setup()
    examples = sorted(data.train_dataset, key=lambda e: int(e["source"].rpartition(":")[2]))  # setup shuffles
    return SFTCollator(data.tokenizer.pad_token_id)(examples), data


MESSAGES = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "Fine."},
]
CHAT_PROMPT = (
    "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.mark.parametrize(
    "record,prompt,completion",
    [
        ({"prompt": "Q: 2+2?", "completion": " 4"}, "<s>Q: 2+2?", " 4<|im_end|>"),
        ({"prompt": MESSAGES[:3], "completion": MESSAGES[3:]}, CHAT_PROMPT, "Fine.<|im_end|>"),
        ({"messages": MESSAGES}, CHAT_PROMPT, "Fine.<|im_end|>"),
        ({"text": "A fine film."}, "<s>", "A fine film.<|im_end|>"),
        ({"prompt": "Hi", "chosen": " Hello!", "rejected": " Go away."}, "<s>Hi", " Hello!<|im_end|>"),
        (
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."},
            "<s>\n\nHuman: Hi\n\nAssistant:", " Hello!<|im_end|>",
        ),
    ],
    ids=["prompt-completion", "prompt-completion-chat", "messages", "text", "standard-pair", "implicit-pair"],
)  # fmt: skip
def test_the_loss_is_on_the_completion_only(tmp_path, record, prompt, completion):
    """Labelled tokens are the completion (the last assistant turn, the chosen answer, a whole text),
    closed by one EOS; the rest of the row is the prompt as the chat template or the tokenizer writes it."""
    batch, data = batch_of(write_jsonl(tmp_path / "data.jsonl", [record]))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    decode = data.tokenizer.decode
    assert decode(ids[labels == -100]) == prompt and decode(labels[labels != -100]) == completion
    assert torch.equal(labels[labels != -100], ids[labels != -100])


def test_labels_are_the_completion_ids_whatever_the_prompt(tmp_path):
    """A prompt token changed (same length) changes no label; the labels are -100 over the prompt and
    the padding and equal the completion's ids (closed by EOS) in between."""
    records = [
        {"prompt": "Say yes.", "completion": " Yes, gladly."},
        {"prompt": "Say yet.", "completion": " Yes, gladly."},
        {"prompt": "Say no.", "completion": " No."},
    ]
    batch, data = batch_of(write_jsonl(tmp_path / "data.jsonl", records))
    tokenizer = data.tokenizer
    assert (batch["input_ids"][0] != batch["input_ids"][1]).sum() == 1
    assert torch.equal(batch["labels"][0], batch["labels"][1])
    for row, record in enumerate(records):
        prompt = tokenizer(record["prompt"])["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        completion.append(tokenizer.eos_token_id)
        padding = batch["labels"].shape[1] - len(prompt) - len(completion)
        assert batch["labels"][row].tolist() == [-100] * len(prompt) + completion + [-100] * padding
        assert batch["attention_mask"][row].tolist() == [1] * (len(prompt) + len(completion)) + [0] * padding


def test_long_texts_are_cut_at_max_length_without_an_eos(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "x" * 100}])
    batch, data = batch_of(path, max_length=20, max_prompt_length=10)
    assert batch["input_ids"].shape == (1, 20) and data.tokenizer.eos_token_id not in batch["labels"][0]
    assert (batch["labels"][0, 1:] != -100).all()  # every token but the BOS


TEXT, CHAT, PAIR = {"text": "Fine."}, {"messages": MESSAGES}, {"prompt": "Hi", "chosen": "A", "rejected": "B"}
UNPAIRED = {"prompt": "Hi", "completion": "Hello"}


@pytest.mark.parametrize(
    "good,bad,reason",
    [
        (TEXT, {"text": 3}, "field 'text': expected a non-empty string, got int"),
        (TEXT, {"text": "  "}, "field 'text': expected a non-empty string, got an empty string"),
        (TEXT, {"review": "Fine."}, "field 'text': missing"),
        (CHAT, {"messages": MESSAGES[:3]}, "field 'messages[2].role': the last message"),
        (CHAT, {"messages": MESSAGES[3:]}, "field 'messages': no message before the assistant"),
        (UNPAIRED, {**UNPAIRED, "label": 0}, "field 'label': false"),
        (UNPAIRED, {**UNPAIRED, "completion": ["x"]}, "field 'completion[0]': expected a message object"),
        (PAIR, {**PAIR, "rejected": 3}, "field 'rejected': expected a non-empty string, got int"),
    ],
    ids=["text-type", "text-empty", "text-missing", "last-role", "no-prompt", "label", "completion", "pair"],
)  # fmt: skip
def test_a_bad_record_names_file_line_and_field(tmp_path, good, bad, reason):
    path = write_jsonl(tmp_path / "data.jsonl", [good, bad])
    with pytest.raises(DataError, match=f"^{re.escape(f'{path}:2: {reason}')}"):
        SFTDataModule(TINY_ALIAS, [path], val_fraction=0.0).setup()


def test_gzipped_text_files_load(tmp_path):
    """IMDb's layout: gzipped JSON lines with id, rating, label and text; the text is trained on whole."""
    reviews = [{"id": i, "rating": 9, "label": 1, "text": f"Review {i}: a fine film."} for i in range(5)]
    batch, data = batch_of(write_jsonl(tmp_path / "reviews.jsonl.gz", reviews))
    texts = {data.tokenizer.decode(row[row != -100]) for row in batch["labels"]}
    assert texts == {f"Review {i}: a fine film.<|im_end|>" for i in range(5)}


def test_imdb_reviews_load(shared_data):
    imdb = str(shared_data / "sentiment" / "imdb_train.jsonl.gz")
    data = SFTDataModule(TINY_ALIAS, [imdb], max_examples=8, max_length=64, max_prompt_length=None)
    data.setup()
    assert len(data.train_dataset) == len(data.val_dataset) == 8
    example = data.train_dataset[0]
    assert example["source"].startswith(f"{imdb}:")
    assert example["prompt_ids"] == [data.tokenizer.bos_token_id] and len(example["completion_ids"]) == 63

