"""PreferenceDataModule: deterministic splits, collated batches, the CLI signature, clear errors."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from conftest import ASSETS

from dpo_lit.data import DataError, PreferenceDataModule

TRAIN, VAL = str(ASSETS / "tiny_pairs.jsonl"), str(ASSETS / "tiny_pairs_val.jsonl")
TINY = "tiny-random-llama"


def make(**kwargs: object) -> PreferenceDataModule:
    dm = PreferenceDataModule(
        TINY, **{"train_files": [TRAIN], "max_length": 256, "max_prompt_length": 128, **kwargs}
    )
    dm.setup("fit")
    return dm


def test_the_tiny_assets_are_learnable_pairs() -> None:
    dm = make(val_files=[VAL])
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (48, 16)
    rows = [json.loads(line) for line in Path(TRAIN).read_text().splitlines()]
    assert all(r["rejected"].startswith("No.") and not r["chosen"].startswith("No") for r in rows)


def test_batches_follow_the_contract() -> None:
    dm = make(val_files=[VAL], batch_size=4, eval_batch_size=5)
    batch = next(iter(dm.train_dataloader()))
    n, t = batch["input_ids"].shape
    assert n == 8 and batch["attention_mask"].shape == batch["completion_mask"].shape == (8, t)
    assert batch["index"].shape == (4,)
    # Every row's completion is non-empty and ends in EOS (the tiny pairs all fit in max_length).
    eos = dm.tokenizer.eos_token_id
    last = batch["attention_mask"].sum(1) - 1
    assert (batch["input_ids"][torch.arange(n), last] == eos).all()
    assert (batch["completion_mask"].sum(1) >= 1).all()
    # Rows i and B + i share the prompt of example index[i].
    for i, index in enumerate(batch["index"].tolist()):
        prompt = dm.train_dataset[index]["prompt_ids"]
        for row in (i, i + 4):
            assert batch["input_ids"][row, : len(prompt)].tolist() == prompt
    val_sizes = [len(b["index"]) for b in dm.val_dataloader()]
    assert val_sizes == [5, 5, 5, 1]


def test_ordered_dataloader_walks_the_split_in_order() -> None:
    dm = make(val_files=[VAL], eval_batch_size=7)
    for split, dataset in (("train", dm.train_dataset), ("val", dm.val_dataset)):
        indices = torch.cat([b["index"] for b in dm.ordered_dataloader(split)])
        assert indices.tolist() == list(range(len(dataset)))
    with pytest.raises(ValueError, match="split must be"):
        dm.ordered_dataloader("test")


def test_val_fraction_split_is_deterministic_and_disjoint() -> None:
    a, b, c = make(val_fraction=0.25), make(val_fraction=0.25), make(val_fraction=0.25, seed=1)
    sources = [[e["source"] for e in dm.val_dataset.examples] for dm in (a, b, c)]
    assert sources[0] == sources[1] and sources[0] != sources[2] and len(sources[0]) == 12
    train = {e["source"] for e in a.train_dataset.examples}
    assert len(train) == 36 and not train & set(sources[0])


def test_setup_tokenizes_once_and_caps_examples() -> None:
    dm = make(val_files=[VAL], max_examples=10)
    dataset = dm.train_dataset
    dm.setup("validate")
    assert dm.train_dataset is dataset
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (10, 10)


def test_unpaired_mode_unpairs_pairs_as_trl_does() -> None:
    dm = make(val_files=[VAL], mode="unpaired", batch_size=3)
    assert len(dm.train_dataset) == 96
    labels = [e["label"] for e in dm.train_dataset.examples]
    assert sum(labels) == 48
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 6 and batch["label"].dtype == torch.bool


def assert_kto_mismatched_rows_take_another_prompts_completion(batch: dict) -> None:
    """Each mismatched row B + i holds prompt_i and the completion of a row whose prompt differs."""
    b = len(batch["index"])
    rows = [batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist() for r in range(2 * b)]
    completions = [batch["input_ids"][r][batch["completion_mask"][r]].tolist() for r in range(2 * b)]
    prompts = [row[: len(row) - len(c)] for row, c in zip(rows, completions)]
    for i in range(b):
        assert prompts[b + i] == prompts[i]
        sources = [j for j in range(b) if completions[j] == completions[b + i]]
        assert sources, f"mismatched row {i} holds no completion of its batch"
        # Some completions recur under several prompts ("No. ..."): one source must hold another prompt.
        assert any(prompts[j] != prompts[i] for j in sources), (
            f"mismatched row {i} pairs a prompt with its own completion (rows {sources})"
        )


def test_kto_mismatched_rows_never_share_a_prompt_in_validation() -> None:
    # Validation is unshuffled: each pair's chosen and rejected rows are adjacent.
    dm = make(val_files=[VAL], mode="unpaired", eval_batch_size=8)
    batches = list(dm.val_dataloader())
    assert len(batches) == 4
    for batch in batches:
        assert_kto_mismatched_rows_take_another_prompts_completion(batch)


def test_kto_mismatched_rows_never_share_a_prompt_in_shuffled_training() -> None:
    dm = make(val_files=[VAL], mode="unpaired", batch_size=16)
    loader = dm.train_dataloader()
    batches = [batch for _ in range(3) for batch in loader]  # three epochs, three shuffles
    assert len(batches) == 18
    for batch in batches:
        assert_kto_mismatched_rows_take_another_prompts_completion(batch)


def test_kto_mismatched_rows_never_take_another_pair_of_the_same_prompt(tmp_path: Path) -> None:
    # Datasets hold several pairs of one prompt (UltraFeedback: several per prompt): a completion of
    # the prompt's other pair is still written for that prompt, so prompts, not pairs, are compared.
    rows = [json.loads(line) for line in Path(VAL).read_text().splitlines()]
    second = [{**r, "chosen": r["chosen"] + " Really.", "rejected": r["rejected"] + " Sorry."} for r in rows]
    path = tmp_path / "two_pairs_a_prompt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + second))
    dm = make(train_files=[str(path)], val_files=[str(path)], mode="unpaired", batch_size=8, eval_batch_size=8)
    loader = dm.train_dataloader()
    batches = [*dm.val_dataloader(), *(batch for _ in range(3) for batch in loader)]
    assert len(batches) == 8 + 3 * 8
    for batch in batches:
        assert_kto_mismatched_rows_take_another_prompts_completion(batch)


def test_unpaired_data_in_paired_mode_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "completion": "Hello!", "label": True}) + "\n")
    with pytest.raises(DataError, match="kto.jsonl: unpaired data .* use `mode: unpaired`.*KTOLoss"):
        make(train_files=[str(path)])


def test_hub_dataset_with_its_own_validation_split(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    rows = [json.loads(line) for line in Path(TRAIN).read_text().splitlines()]
    splits = {"train": rows[:40], "test": rows[40:]}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: splits[split])
    dm = make(train_files=["hub:someone/pairs"], val_files=["hub:someone/pairs?split=test"])
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (40, 8)
    assert dm.val_dataset[0]["source"].startswith("hub:someone/pairs?split=test[")


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="at least one training file or Hub split"):
        PreferenceDataModule(TINY)
    with pytest.raises(ValueError, match="max_prompt_length"):
        PreferenceDataModule(TINY, train_files=[TRAIN], max_length=64, max_prompt_length=64)


def test_every_argument_is_typed_and_documented() -> None:
    doc = inspect.getdoc(PreferenceDataModule) or ""
    for name, parameter in inspect.signature(PreferenceDataModule.__init__).parameters.items():
        if name != "self":
            assert parameter.annotation is not inspect.Parameter.empty, name
            assert f"\n    {name}: " in doc, f"{name} is not documented under Args:"


def test_the_cli_parser_accepts_the_signature() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PreferenceDataModule, "data")
    config = parser.parse_args(
        ["--data.tokenizer_name=tiny", "--data.train_files=[a.jsonl]", "--data.mode=unpaired"]
    )
    # a relative path on the command line starts at the current directory (in a config file, at its folder)
    assert config.data.train_files == [str(Path.cwd() / "a.jsonl")] and config.data.max_prompt_length == 512
    with pytest.raises(SystemExit):
        parser.parse_args(["--data.tokenizer_name=tiny", "--data.format=yaml"])


def test_setup_says_what_data_it_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One line: how many train and validation examples, from where, in which format, and what was
    skipped (bad records), dropped (nothing left of a completion) or truncated to fit."""
    rows = [{"prompt": f"Question {i}?", "chosen": "A fine answer.", "rejected": "No."} for i in range(6)]
    rows[2]["chosen"] = "word " * 200  # cut to fit max_length 64
    rows[4]["chosen"] = 3  # a bad record
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("INFO"):
        make(train_files=[str(path)], val_fraction=0.2, max_length=64, max_prompt_length=32, on_bad_record="skip").setup()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    assert said == [
        f"data: 4 train and 1 validation paired examples from {path} (validation: 0.2 of the training records); "
        "format standard; 1 bad record(s) skipped, 0 example(s) dropped, 1 truncated to fit"
    ]
