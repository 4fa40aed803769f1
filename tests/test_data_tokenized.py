"""The ``tokenized`` format trains on sampled ids as given; pairs built from samples round-trip to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from dpo_lit.data import DataError, DataWarning, PreferenceDataModule, detect_format, load_examples
from dpo_lit.data.io import write_jsonl
from dpo_lit.sampling.pairs import build_pairs
from dpo_lit.sampling.sample import Sample

BOS, EOS = 256, 257  # the tiny tokenizer's <s> and <|im_end|>
PROMPT = [BOS, 40, 41, 42, 43]
FINISHED = [10, 11, EOS]  # the model wrote its end
CUT = [20, 21, 22, 23]  # max_new_tokens cut it: no EOS, and none may be added


def row(**overrides: object) -> dict:
    base = {
        "prompt": "Hi?",
        "chosen": "text that does not re-tokenise to the ids",
        "rejected": "other text",
        "prompt_ids": PROMPT,
        "chosen_ids": FINISHED,
        "rejected_ids": CUT,
    }
    return {**base, **overrides}


def write(tmp_path: Path, rows: list[dict], name: str = "pairs.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rows_with_ids_are_detected_before_the_text_formats() -> None:
    assert detect_format(row(), "x:1") == "tokenized"
    assert detect_format({k: v for k, v in row().items() if k.endswith("_ids")}, "x:1") == "tokenized"


def test_ids_are_trained_as_given(tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    [t] = load_examples([write(tmp_path, [row()])], tiny_tokenizer)
    assert (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]) == (PROMPT, FINISHED, CUT)
    assert t["source"].endswith("pairs.jsonl:1")


def test_truncation_and_the_zero_token_drop_still_apply(
    tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    path = write(tmp_path, [row(), row(prompt_ids=[BOS, *range(30, 40)])])
    [short, long] = load_examples([path], tiny_tokenizer, max_length=7, max_prompt_length=4)
    assert short["prompt_ids"] == [BOS, 41, 42, 43]  # keep_end keeps the BOS the tokenizer adds
    assert short["chosen_ids"] == FINISHED and short["rejected_ids"] == [20, 21, 22]  # cut, no EOS added
    assert long["prompt_ids"] == [BOS, 37, 38, 39]
    with pytest.warns(DataWarning, match=r"pairs\.jsonl: dropped 2 example\(s\)"):
        assert load_examples([path], tiny_tokenizer, max_length=5, max_prompt_length=None) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"chosen_ids": "10 11"}, r"field 'chosen_ids': expected a non-empty list of token ids, got a string"),
        ({"rejected_ids": []}, r"field 'rejected_ids': expected a non-empty list of token ids, got an empty list"),
        ({"prompt_ids": [BOS, 1.5]}, r"field 'prompt_ids\[1\]': expected a non-negative integer token id, got 1.5"),
        ({"chosen_ids": [True]}, r"field 'chosen_ids\[0\]': expected a non-negative integer token id, got True"),
        ({"chosen_ids": [-3]}, r"field 'chosen_ids\[0\]': expected a non-negative integer token id, got -3"),
        ({"rejected_ids": FINISHED}, r"fields 'chosen_ids' and 'rejected_ids': identical completions"),
        ({"rejected_ids": [5, 999]}, r"field 'rejected_ids': token id 999 is outside the tokenizer's vocabulary"),
        ({"prompt": 3}, r"field 'prompt': expected a string or a list of messages, got int"),
    ],
)  # fmt: skip
def test_bad_ids_name_file_line_and_field(
    tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path, overrides: dict, message: str
) -> None:
    path = write(tmp_path, [row(), row(**overrides)])
    with pytest.raises(DataError, match=rf"pairs\.jsonl:2: {message}"):
        load_examples([path], tiny_tokenizer)
    with pytest.warns(DataWarning, match=r"skipped 1 record"):
        assert len(load_examples([path], tiny_tokenizer, on_bad_record="skip")) == 1


def test_unpaired_mode_keeps_the_ids(tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    good, bad = load_examples([write(tmp_path, [row()])], tiny_tokenizer, mode="unpaired")
    assert (good["prompt_ids"], good["completion_ids"], good["label"]) == (PROMPT, FINISHED, True)
    assert (bad["prompt_ids"], bad["completion_ids"], bad["label"]) == (PROMPT, CUT, False)


def test_text_and_tokenized_files_mix_in_file_order(
    tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    text = write(tmp_path, [{"prompt": "Hi?", "chosen": " Yes", "rejected": " No"}], "text.jsonl")
    ids = write(tmp_path, [row()])
    first, second, third = load_examples([ids, text, ids], tiny_tokenizer)
    assert first["chosen_ids"] == third["chosen_ids"] == FINISHED
    assert tiny_tokenizer.decode(second["rejected_ids"]) == " No<|im_end|>"


def test_the_datamodule_batches_the_ids(tmp_path: Path) -> None:
    data = PreferenceDataModule("tiny-random-llama", [write(tmp_path, [row()])], val_fraction=0.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"][0, :8].tolist() == PROMPT + FINISHED
    assert batch["input_ids"][1, :9].tolist() == PROMPT + CUT
    assert batch["completion_mask"].sum(-1).tolist() == [3, 4]


# Pairs from scored samples -----------------------------------------------------------------------


def samples() -> list[Sample]:
    """Two prompts: three samples of prompt 0 (one cut), two equal-scored samples of prompt 1."""
    return [
        Sample(0, PROMPT, [10, EOS], True, -1.0, "a"),
        Sample(0, PROMPT, [11, 12, 13], False, -2.0, "b"),
        Sample(0, PROMPT, [14, EOS], True, -3.0, "c"),
        Sample(1, [BOS, 50], [15, EOS], True, -1.0, "d"),
        Sample(1, [BOS, 50], [16, EOS], True, -1.0, "e"),
    ]


def test_best_worst_pairs_keep_the_sampled_ids() -> None:
    prompts = ["first", [{"role": "user", "content": "second"}]]
    rows, stats = build_pairs(samples(), torch.tensor([0.2, 0.9, -0.5, 0.1, 0.1]), prompts)
    assert len(rows) == 1 and (stats.pairs, stats.ties, stats.prompts_without_pair) == (1, 1, 1)
    [r] = rows
    assert (r["prompt"], r["chosen"], r["rejected"]) == ("first", "b", "c")
    assert (r["chosen_ids"], r["rejected_ids"], r["prompt_ids"]) == ([11, 12, 13], [14, EOS], PROMPT)
    assert (r["chosen_finished"], r["rejected_finished"]) == (False, True)
    assert r["chosen_score"] == pytest.approx(0.9) and r["rejected_score"] == pytest.approx(-0.5)


def test_all_pairs_and_the_margin() -> None:
    scores = [0.2, 0.9, -0.5, 0.1, 0.1]
    rows, stats = build_pairs(samples(), scores, ["first", "second"], "all_pairs")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("b", "a"), ("b", "c"), ("a", "c")]
    assert stats.ties == 1
    rows, stats = build_pairs(samples(), scores, ["first", "second"], "all_pairs", min_margin=0.75)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("b", "c")]
    assert (stats.under_margin, stats.ties, stats.pairs) == (1 + 1, 1, 1)  # b-a 0.7, a-c 0.7 < 0.75


def test_written_pairs_load_back_as_the_same_ids(
    tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    rows, _ = build_pairs(samples(), [0.2, 0.9, -0.5, 0.1, 0.3], ["first", "second"])
    path = write_jsonl(rows, tmp_path / "out" / "pairs.jsonl")
    assert [p.name for p in path.parent.iterdir()] == ["pairs.jsonl"]  # no temporary file left
    loaded = load_examples([str(path)], tiny_tokenizer)
    assert [(t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]) for t in loaded] == [
        (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows
    ]
