"""Reading records from every file type, with locations that name file and line."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from dpo_lit.data import DataError, DataReport, read_examples, read_records

ROWS = [
    {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
    {"prompt": "Tea?", "chosen": "Yes,\nplease.", "rejected": "No."},
]


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_jsonl_locations_are_lines_and_empty_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert list(read_records(str(path))) == [(ROWS[0], f"{path}:1"), (ROWS[1], f"{path}:4")]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json", ".json.gz", ".csv", ".csv.gz", ".parquet"])
def test_every_file_type_reads_the_same_records(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    if suffix.startswith(".jsonl"):
        write_jsonl(path, ROWS, gz=True)
    elif suffix.startswith(".json"):
        with gzip.open(path, "wt") if suffix.endswith(".gz") else path.open("w") as f:
            json.dump(ROWS, f)
    elif suffix == ".csv":
        write_csv(path, ROWS)
    elif suffix == ".csv.gz":
        with gzip.open(path, "wb") as f:
            f.write(write_csv(tmp_path / "plain.csv", ROWS).read_bytes())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    records, locations = zip(*read_records(str(path)))
    assert list(records) == ROWS
    expected = {".json": [f"{path}[0]", f"{path}[1]"], ".csv": [f"{path}:2", f"{path}:3"]}
    expected[".parquet"] = expected[".json"]
    kind = suffix.removesuffix(".gz")
    assert list(locations) == expected.get(kind, [f"{path}:1", f"{path}:2"])


def test_csv_location_is_the_line_where_a_multiline_record_starts(tmp_path: Path) -> None:
    rows = [*ROWS, {"prompt": "Bye?", "chosen": "Bye!", "rejected": "Finally."}]
    path = write_csv(tmp_path / "d.csv", rows)  # row 2 spans lines 3-4
    assert [loc for _, loc in read_records(str(path))] == [f"{path}:2", f"{path}:3", f"{path}:5"]


def test_parquet_keeps_message_lists(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Bye."}],
    }
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "c.parquet")
    [example] = read_examples([str(tmp_path / "c.parquet")])
    assert example.chosen == row["chosen"] and example.source.endswith("c.parquet[0]")


def test_relative_paths_start_at_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    assert [loc for _, loc in read_records("d.jsonl")] == ["d.jsonl:1", "d.jsonl:2"]


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "x", "chosen": \n' + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        list(read_records(str(path)))
    report = DataReport("skip")
    assert [r for r, _ in read_records(str(path), report=report)] == ROWS
    assert report.first_skipped == {(str(path), next(iter(report.skipped))[1]): f"{path}:2"}


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        list(read_records(str(tmp_path / "nope.jsonl")))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"d\.txt: unknown file type"):
        list(read_records(str(tmp_path / "d.txt")))


def test_hub_source_calls_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name: str, config: str | None, split: str, **kwargs: object) -> list[dict]:
        calls.append((name, config, split, kwargs))
        return ROWS

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.delenv("DPO_LIT_DATA", raising=False)
    examples = read_examples(["hub:Anthropic/hh-rlhf?data_dir=harmless-base&split=test"])
    assert calls == [("Anthropic/hh-rlhf", None, "test", {"data_dir": "harmless-base"})]
    source = "hub:Anthropic/hh-rlhf?data_dir=harmless-base&split=test"
    assert [e.source for e in examples] == [f"{source}[0]", f"{source}[1]"]


def test_hub_source_loads_a_local_dataset_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    examples = read_examples([f"hub:{folder}"])
    assert [e.chosen for e in examples] == ["Hello!", "Yes,\nplease."]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".jsonl.gz"])
def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path: Path, suffix: str) -> None:
    good = [json.dumps(r) for r in ROWS]
    if suffix == ".csv":
        data = b"prompt,chosen,rejected\nHi?,Hello!,Go away.\ncaf\xe9,a,b\n"
    elif suffix == ".json":
        data = ("[\n" + good[0] + ",\n").encode() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}]\n'
    else:
        data = ("\n".join(good) + "\n").encode() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    with pytest.raises(DataError, match="not UTF-8 text") as info:
        list(read_records(str(path)))
    assert info.value.source == f"{path}:3"


def test_truncated_or_corrupt_gzip_names_the_file_and_where_it_broke_off(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "chosen": "yes " * 20, "rejected": "no"} for i in range(3000)]
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt gzip") as info:
        list(read_records(str(cut)))
    line = int(info.value.source.rsplit(":", 1)[1])
    assert info.value.source.startswith(f"{cut}:") and 1 < line < 3000
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text(json.dumps(ROWS[0]) + "\n")  # named .gz, not compressed
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        list(read_records(str(plain)))


def test_byte_order_marks_and_windows_line_ends_are_read(tmp_path: Path) -> None:
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(("\ufeff" + "\r\n".join(json.dumps(r) for r in ROWS) + "\r\n").encode())
    assert [record for record, _ in read_records(str(jsonl))] == ROWS
    table = tmp_path / "bom.csv"
    table.write_bytes("\ufeffprompt,chosen,rejected\r\nHi?,Hello!,Go away.\r\n".encode())
    assert [record for record, _ in read_records(str(table))] == [ROWS[0]]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_very_long_line_is_one_record(tmp_path: Path, suffix: str) -> None:
    """A 20 MB answer on one line (CSV's default field limit is 128 KB) is read whole, and the
    line after it keeps its number."""
    rows = [{**ROWS[0], "chosen": "word " * 4_000_000}, ROWS[1]]
    path = write_jsonl(tmp_path / "long.jsonl", rows) if suffix == ".jsonl" else write_csv(tmp_path / "long.csv", rows)
    records = list(read_records(str(path)))
    assert [record for record, _ in records] == rows
    assert records[1][1] == f"{path}:{2 if suffix == '.jsonl' else 3}"
