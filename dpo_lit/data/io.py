"""Read raw records from local files or Hugging Face Hub datasets, each with its location.

Every reader yields ``(record, location)``; the location is what error messages and the
examples' ``source`` carry:

=====================  ===========================  ==========================================
source                 location                     meaning
=====================  ===========================  ==========================================
``x.jsonl[.gz]``       ``x.jsonl:12``               1-based line (empty lines are skipped)
``x.csv[.gz]``         ``x.csv:3``                  1-based line where the record starts
``x.json[.gz]``        ``x.json[4]``                0-based index in the top-level list
``x.parquet``          ``x.parquet[4]``             0-based row
``hub:NAME?split=S``   ``hub:NAME?split=S[4]``      0-based row of the split (a split the local
                                                    mirror holds is read from its file instead)
=====================  ===========================  ==========================================

Relative paths are relative to the current working directory and are reported as given (paths in
a config file are made absolute from the config's folder when it is parsed, :class:`DataSource`).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from jsonargparse.typing import register_type

from dpo_lit.data.errors import DataError, DataReport
from dpo_lit.data.hub import HUB_PREFIX, HubSource, hub_rows, mirror_file

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

Record = dict[str, Any]


class DataSource(str):
    """A data file or Hub split (``hub:...``) named in a config or on the command line.

    The CLI parses it with :func:`resolve_source`: a relative path in a config file starts at that
    file's folder (the parser works in it while reading the file), one on the command line at the
    current directory, so a config names its data the same way from wherever it is run.
    """


def resolve_source(value: str) -> DataSource:
    """``value`` as an absolute path from the current directory (a Hub split as it is)."""
    if not isinstance(value, str):
        raise TypeError(f"expected a file path or hub:NAME, got {type(value).__name__}")
    if value.startswith(HUB_PREFIX):
        return DataSource(value)
    return DataSource(os.path.abspath(os.path.expanduser(value)))


# How configs parse it: jsonargparse reads a config file from inside the file's folder.
register_type(DataSource, serializer=str, deserializer=resolve_source)


def _open_bytes(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _not_utf8(location: str, error: UnicodeDecodeError) -> DataError:
    byte = error.object[error.start]
    return DataError(location, f"not UTF-8 text ({error.reason}, byte 0x{byte:02x}); save the file as UTF-8")


def _text_lines(path: Path, name: str) -> Iterator[str]:
    """The file's lines as text, line endings kept; a line that is not UTF-8 raises a DataError
    naming it. A byte-order mark (as some Windows editors write) is skipped."""
    with _open_bytes(path) as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(f"{name}:{number}", e) from None


def _text(path: Path, name: str) -> str:
    """The whole file as text (see :func:`_text_lines`)."""
    with _open_bytes(path) as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise _not_utf8(f"{name}:{line}", e) from None


def _kind(path: Path) -> str:
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    kind = suffixes[0] if suffixes else ""
    if kind not in SUFFIXES or (path.suffix == ".gz" and kind == ".parquet"):
        raise DataError(
            str(path), "unknown file type; expected .jsonl, .json, .csv (optionally .gz) or .parquet"
        )
    return kind


def _check_record(record: object, location: str) -> Record:
    if not isinstance(record, dict):
        raise DataError(location, f"expected a JSON object (a record), got {type(record).__name__}")
    return record


def read_jsonl(path: Path, name: str, report: DataReport) -> Iterator[tuple[Record, str]]:
    """Records of a JSON-lines file; a malformed line goes to ``report`` (which raises or counts)."""
    for number, line in enumerate(_text_lines(path, name), start=1):
        if not line.strip():
            continue
        location = f"{name}:{number}"
        try:
            yield _check_record(json.loads(line), location), location
        except json.JSONDecodeError as e:
            report.bad_record(DataError(location, f"malformed JSON: {e.msg} (column {e.colno})"))
        except DataError as e:
            report.bad_record(e)


def read_json(path: Path, name: str, report: DataReport) -> Iterator[tuple[Record, str]]:
    """Records of a JSON file holding a list of objects (or ``{"data": [...]}``)."""
    try:
        data = json.loads(_text(path, name))
    except json.JSONDecodeError as e:
        raise DataError(f"{name}:{e.lineno}", f"malformed JSON: {e.msg} (column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(name, f"expected a JSON list of records, got {type(data).__name__}")
    for index, record in enumerate(data):
        location = f"{name}[{index}]"
        try:
            yield _check_record(record, location), location
        except DataError as e:
            report.bad_record(e)


def read_csv(path: Path, name: str, report: DataReport) -> Iterator[tuple[Record, str]]:
    """Records of a CSV file with a header row; every value is a string, of any length (the csv
    module refuses fields over 128 KB unless told otherwise: a long answer is not a bad record)."""
    csv.field_size_limit(2**31 - 1)
    reader = csv.DictReader(_text_lines(path, name))
    start = 2  # line 1 is the header
    try:
        for row in reader:
            location = f"{name}:{start}"
            start = reader.line_num + 1
            if None in row:
                report.bad_record(DataError(location, "more values than header columns"))
                continue
            yield dict(row), location
    except csv.Error as e:
        raise DataError(f"{name}:{reader.line_num}", f"malformed CSV: {e}") from None


def read_parquet(path: Path, name: str, report: DataReport) -> Iterator[tuple[Record, str]]:
    """Records of a Parquet file, read in batches (nested lists of messages stay lists)."""
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield record, f"{name}[{index}]"
            index += 1


def read_records(source: str, report: DataReport | None = None) -> Iterator[tuple[Record, str]]:
    """Records of a local file (by suffix) or of a Hub split (``hub:NAME?...``, see
    :mod:`dpo_lit.data.hub`; read from the local mirror's file when it holds one), with locations.

    A malformed record goes to ``report``, which raises it (the default) or counts it and reading
    goes on.

    Raises:
        DataError: the file is missing, of an unknown type or unreadable, a record is malformed, or
            a Hub split can be had neither from the mirror nor from the Hub.
    """
    report = report if report is not None else DataReport()
    if source.startswith(HUB_PREFIX):
        hub = HubSource.parse(source)
        local = mirror_file(hub)
        if local is None:
            for index, record in enumerate(hub_rows(hub)):
                yield record, f"{hub}[{index}]"
            return
        source = str(local)
    path = Path(source).expanduser()
    if not path.is_file():
        start = "" if path.is_absolute() else f" (relative paths start at {Path.cwd()})"
        raise DataError(source, f"file not found{start}")
    reader = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}
    last = None  # the location of the last record read, to say where an unreadable file broke off
    try:
        for record, location in reader[_kind(path)](path, source, report):
            last = location
            yield record, location
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(_after(source, last), f"truncated or corrupt gzip file ({e})") from None
    except OSError as e:  # pyarrow's errors for a corrupt Parquet file are OSErrors too
        raise DataError(_after(source, last), f"unreadable file ({e})") from None


def _after(source: str, last: str | None) -> str:
    """Where a file broke off: the line after the last record read (``path:N``), or the path."""
    if last is not None and last.startswith(f"{source}:") and last[len(source) + 1 :].isdigit():
        return f"{source}:{int(last[len(source) + 1 :]) + 1}"
    return f"{source} (after {last})" if last else source


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, rename it onto
    ``path`` (atomic: a reader or a crash never sees half a file). The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write one JSON object per line, atomically."""
    with atomic_write(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def write_json(value: Any, path: str | Path) -> Path:
    """Write ``value`` as indented JSON, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(path)
