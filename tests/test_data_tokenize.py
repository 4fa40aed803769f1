"""Token ids round-trip to exactly the text the model should see: one BOS, one closing EOS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from dpo_lit.data import (
    DataReport,
    DataWarning,
    PairedExample,
    UnpairedExample,
    load_examples,
    read_examples,
    tokenize_examples,
)
from dpo_lit.data.tokenize import close_completion, truncate_prompt

SMOL_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)
USER, ASSISTANT = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}
HH = "preference/hh_rlhf_test/harmless-base-test.jsonl.gz"


def pair(prompt: object = "Hi?", chosen: object = " Hello!", rejected: object = " Bye.") -> PairedExample:
    return PairedExample(prompt, chosen, rejected, "mem:1")


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_tiny_plain_text_has_one_bos_and_one_eos(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    [t] = tokenize_examples([pair()], tiny_tokenizer)
    assert decode(tiny_tokenizer, t["prompt_ids"] + t["chosen_ids"]) == "<s>Hi? Hello!<|im_end|>"
    assert decode(tiny_tokenizer, t["prompt_ids"] + t["rejected_ids"]) == "<s>Hi? Bye.<|im_end|>"
    assert t["prompt_ids"].count(tiny_tokenizer.bos_token_id) == 1
    assert t["chosen_ids"].count(tiny_tokenizer.eos_token_id) == 1
    assert t["chosen_ids"][-1] == tiny_tokenizer.eos_token_id


def test_tiny_chat_template_bos_is_not_doubled(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    [t] = tokenize_examples(
        [pair([USER], [ASSISTANT], [{"role": "assistant", "content": "Bye."}])], tiny_tokenizer
    )
    text = decode(tiny_tokenizer, t["prompt_ids"] + t["chosen_ids"])
    assert text == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>"
    assert t["prompt_ids"][:2] == [
        tiny_tokenizer.bos_token_id,
        tiny_tokenizer.convert_tokens_to_ids("<|im_start|>"),
    ]
    assert (t["prompt_ids"] + t["chosen_ids"]).count(tiny_tokenizer.bos_token_id) == 1


def test_a_doubled_bos_in_plain_text_is_collapsed(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    [t] = tokenize_examples([pair("<s>Hi?")], tiny_tokenizer)
    assert decode(tiny_tokenizer, t["prompt_ids"]) == "<s>Hi?"


def test_smollm2_chatml_closes_the_completion_with_one_im_end(
    smol_tokenizer: PreTrainedTokenizerBase,
) -> None:
    turn = [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."}]
    examples = [
        pair([USER], [ASSISTANT], [{"role": "assistant", "content": "Bye."}]),
        pair([USER], [ASSISTANT, *turn], [ASSISTANT]),
    ]
    single, multi = tokenize_examples(examples, smol_tokenizer)
    prompt = f"{SMOL_SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert decode(smol_tokenizer, single["prompt_ids"]) == prompt
    assert decode(smol_tokenizer, single["prompt_ids"] + single["chosen_ids"]) == prompt + "Hello!<|im_end|>"
    assert decode(smol_tokenizer, single["rejected_ids"]) == "Bye.<|im_end|>"
    eos = smol_tokenizer.eos_token_id
    assert single["chosen_ids"].count(eos) == 1 and single["chosen_ids"][-1] == eos
    # A completion of several messages keeps its inner ends and is closed by exactly one.
    assert decode(smol_tokenizer, multi["chosen_ids"]) == (
        "Hello!<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\nWelcome.<|im_end|>"
    )
    assert multi["chosen_ids"].count(eos) == 3 and multi["chosen_ids"][-2] != eos


def test_smollm2_plain_text_adds_no_bos(smol_tokenizer: PreTrainedTokenizerBase) -> None:
    [t] = tokenize_examples([pair(chosen=" Hello!<|im_end|>")], smol_tokenizer)
    assert decode(smol_tokenizer, t["prompt_ids"] + t["chosen_ids"]) == "Hi? Hello!<|im_end|>"
    assert decode(smol_tokenizer, t["prompt_ids"] + t["rejected_ids"]) == "Hi? Bye.<|im_end|>"


@pytest.mark.parametrize("name", ["tiny_tokenizer", "smol_tokenizer"])
def test_hh_rlhf_round_trips_exactly(request: pytest.FixtureRequest, shared_data: Path, name: str) -> None:
    tokenizer = request.getfixturevalue(name)
    bos = "<s>" if name == "tiny_tokenizer" else ""
    examples = read_examples([str(shared_data / HH)], report=DataReport("skip"))[:400]
    tokenized = tokenize_examples(examples, tokenizer, max_length=10**6, max_prompt_length=None)
    assert len(tokenized) == len(examples)
    for e, t in zip(examples, tokenized):
        assert decode(tokenizer, t["prompt_ids"] + t["chosen_ids"]) == f"{bos}{e.prompt}{e.chosen}<|im_end|>"
        assert (
            decode(tokenizer, t["prompt_ids"] + t["rejected_ids"]) == f"{bos}{e.prompt}{e.rejected}<|im_end|>"
        )


def test_close_completion() -> None:
    eos = 9
    assert close_completion([1, 2], chat=False, eos=eos) == [1, 2, 9]
    assert close_completion([1, 9], chat=False, eos=eos) == [1, 9]
    assert close_completion([1, 9, 5], chat=True, eos=eos) == [1, 9]  # "Hi!<|im_end|>\n"
    assert close_completion([1, 9, 2, 9, 5], chat=True, eos=eos) == [1, 9, 2, 9]
    assert close_completion([1, 2], chat=True, eos=eos) == [1, 2, 9]


def test_truncate_prompt_modes() -> None:
    ids = [0, 1, 2, 3, 4, 5]
    assert truncate_prompt(ids, 3, "keep_end", bos=None) == [3, 4, 5]
    assert truncate_prompt(ids, 3, "keep_end", bos=0) == [0, 4, 5]  # a BOS the tokenizer adds is kept
    assert truncate_prompt(ids, 3, "keep_start", bos=0) == [0, 1, 2]
    assert truncate_prompt(ids, None, "keep_end", bos=None) == ids


@pytest.mark.parametrize(("mode", "kept"), [("keep_end", "<s>ghij"), ("keep_start", "<s>abcd")])
def test_max_prompt_length_truncates_the_prompt(
    tiny_tokenizer: PreTrainedTokenizerBase, mode: str, kept: str
) -> None:
    [t] = tokenize_examples([pair("abcdefghij")], tiny_tokenizer, max_prompt_length=5, truncation_mode=mode)
    assert decode(tiny_tokenizer, t["prompt_ids"]) == kept
    assert decode(tiny_tokenizer, t["chosen_ids"]) == " Hello!<|im_end|>"  # the same prompt for both


def test_max_length_cuts_the_completion_and_its_eos(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    [t] = tokenize_examples(
        [pair("abc", " Hello!", " No")], tiny_tokenizer, max_length=4 + 4, max_prompt_length=None
    )
    assert decode(tiny_tokenizer, t["chosen_ids"]) == " Hel"  # cut: no EOS re-appended
    assert decode(tiny_tokenizer, t["rejected_ids"]) == " No<|im_end|>"  # fits: closed
    assert len(t["prompt_ids"] + t["chosen_ids"]) == 8


def test_a_completion_cut_to_nothing_is_dropped_and_reported(
    tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    rows = [{"prompt": "x" * n, "chosen": "Yes!", "rejected": "No."} for n in (3, 20, 30, 4)]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(
        DataWarning, match=r"long\.jsonl: dropped 2 example\(s\).*raise max_length or lower max_prompt_length"
    ):
        tokenized = load_examples([str(path)], tiny_tokenizer, max_length=16, max_prompt_length=None)
    assert [t["source"] for t in tokenized] == [f"{path}:1", f"{path}:4"]
    assert all(t["chosen_ids"] and t["rejected_ids"] for t in tokenized)


def test_real_data_keeps_every_bound(smol_tokenizer: PreTrainedTokenizerBase, shared_data: Path) -> None:
    with pytest.warns(DataWarning, match="skipped"):
        tokenized = load_examples(
            [str(shared_data / HH)], smol_tokenizer, max_length=64, max_prompt_length=48, on_bad_record="skip"
        )
    assert len(tokenized) == 2308
    assert all(
        len(t["prompt_ids"]) <= 48 and len(t["prompt_ids"]) + len(t["chosen_ids"]) <= 64 for t in tokenized
    )
    assert all(len(t["chosen_ids"]) >= 1 and len(t["rejected_ids"]) >= 1 for t in tokenized)


def test_unpaired_examples_tokenize_with_labels(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    examples = [
        UnpairedExample("Hi?", " Hello!", True, "m:1"),
        UnpairedExample([USER], [ASSISTANT], False, "m:2"),
    ]
    plain, chat = tokenize_examples(examples, tiny_tokenizer)
    assert decode(tiny_tokenizer, plain["prompt_ids"] + plain["completion_ids"]) == "<s>Hi? Hello!<|im_end|>"
    assert plain["label"] is True and chat["label"] is False
    assert decode(tiny_tokenizer, chat["completion_ids"]) == "Hello!<|im_end|>"
