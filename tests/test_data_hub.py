"""Hub-first data: ``hub:`` sources, the local mirror ($DPO_LIT_DATA), the offline one-line error,
and config paths that start at the config's folder wherever the command runs."""

import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from dpo_lit.data.errors import DataError
from dpo_lit.data.hub import MIRROR, HubSource, mirror_file
from dpo_lit.data.io import read_records, write_jsonl
from dpo_lit.evaluation import tasks
from dpo_lit.evaluation.tasks import TASKS, load_task, load_text_task, task_source

HH = "hub:Anthropic/hh-rlhf?data_dir=helpful-base&split=test"


def dpo_lit(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dpo_lit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def offline_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DPO_LIT_DATA"}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT), **extra}


def test_a_hub_source_names_its_config_data_dir_and_split() -> None:
    source = HubSource.parse(HH)
    assert source == HubSource("Anthropic/hh-rlhf", data_dir="helpful-base", split="test")
    assert str(source) == HH and HubSource.parse(str(source)) == source
    assert HubSource.parse("hub:stanfordnlp/imdb") == HubSource("stanfordnlp/imdb", split="train")
    assert source.load_call() == "datasets.load_dataset('Anthropic/hh-rlhf', data_dir='helpful-base', split='test')"
    for bad in ("hub:x?spilt=test", "hub:x?split=", "hub:?split=test", "hub:x?split=a&split=b"):
        with pytest.raises(DataError, match=bad.replace("?", r"\?")):
            HubSource.parse(bad)


def test_the_mirror_replaces_the_download(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the mirror holds this split: nothing is downloaded")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    monkeypatch.setenv("DPO_LIT_DATA", str(shared_data))
    for source, file in MIRROR.items():  # every entry of the table is a file of the mirror
        assert mirror_file(source) == shared_data / file, source
    rows = [record for record, _ in read_records(HH)]
    with gzip.open(shared_data / "preference/hh_rlhf_test/helpful-base-test.jsonl.gz", "rt") as f:
        assert rows == [json.loads(line) for line in f if line.strip()]
    assert len(rows) == 2354


def test_a_mirror_without_the_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPO_LIT_DATA", str(tmp_path))
    with pytest.raises(DataError) as error:
        list(read_records(HH))
    assert str(error.value) == (
        f"{HH}: DPO_LIT_DATA={tmp_path} has no preference/hh_rlhf_test/helpful-base-test.jsonl.gz; point it at "
        "a folder laid out like the project's shared data, or unset it to download from the Hub"
    )


def test_offline_without_a_mirror_is_one_line_naming_the_data_set_and_both_ways(tmp_path: Path) -> None:
    config = ROOT / "configs/dpo/smollm2_hh_lora.yaml"
    result = dpo_lit("fit", "--config", str(config), "--trainer.max_steps=2", cwd=tmp_path, env=offline_env())
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"dpo-lit: error: {HH}: could not load Anthropic/hh-rlhf from the Hugging Face Hub (")
    assert "datasets.load_dataset('Anthropic/hh-rlhf', data_dir='helpful-base', split='test')" in line
    assert "set DPO_LIT_DATA to a local mirror" in line
    assert not (tmp_path / "runs").exists()  # the data is read before any log folder is made


def test_a_config_runs_from_anywhere_and_a_copied_config_reads_its_own_files(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = dpo_lit("fit", "--config", str(ROOT / "configs/dpo/tiny.yaml"), "--trainer.max_steps=2",
                     cwd=elsewhere, env=offline_env())  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((elsewhere / "runs/tiny-dpo/lightning_logs").glob("version_0/checkpoints/last*.ckpt"))

    mine = tmp_path / "mine"  # a config copied out of the clone, with its data beside it
    (mine / "data").mkdir(parents=True)
    for name in ("tiny_pairs.jsonl", "tiny_pairs_val.jsonl"):
        shutil.copy(ROOT / "dpo_lit/assets" / name, mine / "data" / name)
    text = (ROOT / "configs/dpo/tiny.yaml").read_text().replace("../../dpo_lit/assets/", "data/")
    (mine / "tiny.yaml").write_text(text)
    result = dpo_lit("fit", "--config", "../mine/tiny.yaml", "--trainer.max_steps=1", cwd=elsewhere, env=offline_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"from {mine / 'data/tiny_pairs.jsonl'} (validation: from {mine / 'data/tiny_pairs_val.jsonl'})" in result.stderr
    # on the command line, a path starts at the current directory
    result = dpo_lit("fit", "--config", "../mine/tiny.yaml", "--data.train_files=[data/tiny_pairs.jsonl]",
                     "--trainer.max_steps=1", cwd=elsewhere, env=offline_env())  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"dpo-lit: error: {elsewhere / 'data/tiny_pairs.jsonl'}: file not found"


# ---- evaluation sets: the Hub's rows give the same items as the mirror's files ------------------


def test_every_task_reads_the_mirror_or_else_its_hub_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPO_LIT_DATA", raising=False)
    assert all(task_source(name) == task.hub for name, task in TASKS.items())
    assert all(task.hub in MIRROR for task in TASKS.values())


def hub_folder(tmp_path: Path, rows: list[dict], split: str = "test") -> HubSource:
    """A local dataset folder that ``datasets.load_dataset`` reads as it reads a Hub repository."""
    folder = tmp_path / "hub"
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(rows, folder / f"{split}.jsonl")
    return HubSource(str(folder), split=split)


def from_hub(name: str, source: HubSource, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(TASKS, name, dataclasses.replace(TASKS[name], hub=source))
    monkeypatch.delenv("DPO_LIT_DATA", raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(source.name) + "-cache")
    assert task_source(name) == source
    return load_text_task(name) if tasks.task_kind(name) == "text" else load_task(name)


def test_arc_piqa_boolq_from_the_hub_equal_the_mirror(shared_data, tmp_path, monkeypatch, eval_mirror) -> None:
    eval_mirror(shared_data / "eval")
    arc = [json.loads(line) for line in (shared_data / "eval/ARC-Easy-Test.jsonl").read_text().splitlines()[:20]]
    hub = [{"id": r.get("id", ""), "question": r["question"]["stem"], "answerKey": r["answerKey"],
            "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                        "label": [c["label"] for c in r["question"]["choices"]]}} for r in arc]  # fmt: skip
    mirror = tasks.load_arc(write_jsonl(arc, tmp_path / "arc.jsonl"))
    assert from_hub("arc_easy", hub_folder(tmp_path / "arc", hub), monkeypatch) == mirror

    lines = (shared_data / "eval/piqa_valid.jsonl").read_text().splitlines()[:20]
    labels = (shared_data / "eval/piqa_valid-labels.lst").read_text().split()[:20]
    write_jsonl([json.loads(line) for line in lines], tmp_path / "piqa.jsonl")
    (tmp_path / "piqa-labels.lst").write_text("\n".join(labels) + "\n")
    hub = [{**json.loads(line), "label": int(label)} for line, label in zip(lines, labels)]
    source = hub_folder(tmp_path / "piqa", hub, split="validation")
    assert from_hub("piqa", source, monkeypatch) == tasks.load_piqa(tmp_path / "piqa.jsonl")

    rows = [json.loads(line) for line in (shared_data / "eval/boolq_dev.jsonl").read_text().splitlines()[:20]]
    source = hub_folder(tmp_path / "boolq", rows, split="validation")
    assert from_hub("boolq", source, monkeypatch) == tasks.load_boolq(write_jsonl(rows, tmp_path / "boolq.jsonl"))


def test_wikitext_lambada_hellaswag_from_the_hub(tmp_path, monkeypatch) -> None:
    lines = [" = Title = \n", "\n", " A text @-@ like WikiText , with words . \n", "\n"]
    mirror = tmp_path / "wiki.test.raw"
    mirror.write_text("".join(line for line in lines if line.strip()))
    wiki = from_hub("wikitext", hub_folder(tmp_path / "wiki", [{"text": t} for t in lines]), monkeypatch)
    assert wiki == tasks.wikitext_detokenize(mirror.read_text()) and "A text-like WikiText, with words." in wiki

    passages = ["the cat sat on the mat", "she gave the book back to tom"]
    (tmp_path / "lambada.txt").write_text("\n".join(passages) + "\n")
    source = hub_folder(tmp_path / "lambada", [{"text": p, "domain": None} for p in passages])
    assert from_hub("lambada", source, monkeypatch) == tasks.load_lambada(tmp_path / "lambada.txt")

    row = {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles.",
           "ctx_b": "then", "endings": [", the man adds wax to the windshield.", ", a woman puts on a [title] hat.", ", the man continues.", ", the car moves."],
           "label": "3"}  # fmt: skip
    [item] = from_hub("hellaswag", hub_folder(tmp_path / "hellaswag", [row], split="validation"), monkeypatch)
    assert item.context == (  # lm-eval: preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
        "Removing ice from car: Then, the man writes over the snow covering the window of a car, and a woman "
        "wearing winter clothes smiles. Then"
    )
    assert item.choices[1] == " , a woman puts on a. hat." and item.answer == 3
