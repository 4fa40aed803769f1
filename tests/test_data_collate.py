"""The batch contract: right-padded rows, chosen before rejected, masks exactly on completions."""

from __future__ import annotations

import pickle

import torch

from dpo_lit.data import PreferenceCollator
from dpo_lit.data.collate import mismatched_partners

PAD = 0


def paired(prompt: list[int], chosen: list[int], rejected: list[int], index: int) -> dict:
    return {
        "prompt_ids": prompt,
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        "index": index,
        "source": "m",
    }


def unpaired(prompt: list[int], completion: list[int], label: bool, index: int) -> dict:
    return {"prompt_ids": prompt, "completion_ids": completion, "label": label, "index": index, "source": "m"}


def test_paired_batch_layout() -> None:
    examples = [paired([1, 2], [3, 4, 5], [6], index=7), paired([8], [9], [10, 11, 12, 13], index=2)]
    batch = PreferenceCollator(PAD)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "index"}
    expected_ids = [
        [1, 2, 3, 4, 5],  # prompt_0 + chosen_0
        [8, 9, PAD, PAD, PAD],  # prompt_1 + chosen_1
        [1, 2, 6, PAD, PAD],  # prompt_0 + rejected_0
        [8, 10, 11, 12, 13],  # prompt_1 + rejected_1
    ]
    completion = [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 1]]
    attention = [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    torch.testing.assert_close(batch["input_ids"], torch.tensor(expected_ids))
    torch.testing.assert_close(batch["completion_mask"], torch.tensor(completion, dtype=torch.bool))
    torch.testing.assert_close(batch["attention_mask"], torch.tensor(attention))
    torch.testing.assert_close(batch["index"], torch.tensor([7, 2]))
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["index"].dtype == torch.long


def test_pad_to_multiple_of() -> None:
    batch = PreferenceCollator(PAD, pad_to_multiple_of=8)([paired([1, 2], [3, 4, 5], [6], index=0)])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][:, 5:].sum() == 0 and not batch["completion_mask"][:, 5:].any()


def test_unpaired_batch_has_mismatched_rows_for_the_kl_reference() -> None:
    examples = [
        unpaired([1], [2, 3], True, 0),
        unpaired([4, 5], [6], False, 1),
        unpaired([7], [8, 9, 10], True, 2),
    ]
    batch = PreferenceCollator(PAD, max_length=3)(examples)
    expected_ids = [
        [1, 2, 3, PAD],
        [4, 5, 6, PAD],
        [7, 8, 9, 10],
        [1, 8, 9, PAD],  # prompt_0 + completion_2, cut to max_length = 3
        [4, 5, 2, PAD],  # prompt_1 + completion_0, cut to max_length = 3
        [7, 6, PAD, PAD],  # prompt_2 + completion_1
    ]
    completion = [[0, 1, 1, 0], [0, 0, 1, 0], [0, 1, 1, 1], [0, 1, 1, 0], [0, 0, 1, 0], [0, 1, 0, 0]]
    torch.testing.assert_close(batch["input_ids"], torch.tensor(expected_ids))
    torch.testing.assert_close(batch["completion_mask"], torch.tensor(completion, dtype=torch.bool))
    torch.testing.assert_close(batch["attention_mask"], (batch["input_ids"] != PAD).long())
    torch.testing.assert_close(batch["label"], torch.tensor([True, False, True]))
    torch.testing.assert_close(batch["index"], torch.tensor([0, 1, 2]))


def test_collator_pickles() -> None:
    collator = pickle.loads(pickle.dumps(PreferenceCollator(5, max_length=7, pad_to_multiple_of=4)))
    assert (collator.pad_token_id, collator.max_length, collator.pad_to_multiple_of) == (5, 7, 4)


def test_kto_mismatched_rows_skip_rows_of_the_same_prompt() -> None:
    # Pairs unpaired as adjacent rows (chosen, rejected): a shift by one would pair prompt A with
    # its own rejected completion; the shift by two takes every completion once, from another prompt.
    examples = [
        unpaired([1], [2], True, 0),
        unpaired([1], [3], False, 1),
        unpaired([4], [5], True, 2),
        unpaired([4], [6], False, 3),
    ]
    batch = PreferenceCollator(PAD)(examples)
    expected_kl_rows = [[1, 5], [1, 6], [4, 2], [4, 3]]  # prompt_i + completion_(i - 2 mod 4)
    torch.testing.assert_close(batch["input_ids"][4:], torch.tensor(expected_kl_rows))
    assert batch["completion_mask"][4:].sum().item() == 4


def test_kto_rows_of_a_batch_with_one_prompt_get_no_mismatched_completion() -> None:
    # No row has another prompt, so no mismatched pair exists: the rows keep only their prompt and
    # score no token (log-ratio 0, hence z0 = 0), rather than a matched completion.
    examples = [unpaired([1, 2], [3], True, 0), unpaired([1, 2], [4, 5], False, 1)]
    batch = PreferenceCollator(PAD)(examples)
    torch.testing.assert_close(batch["input_ids"][2:], torch.tensor([[1, 2, PAD, PAD]] * 2))
    assert not batch["completion_mask"][2:].any()
    assert mismatched_partners([[7], [7], [7], [8]]) == [3, 3, 3, 2]  # no one shift fits: nearest
