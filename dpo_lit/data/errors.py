"""The end-of-setup report of what data was skipped or dropped.

A bad record raises :class:`~dpo_lit.errors.DataError` whose message is one line, ``path:line: field 'chosen':
expected a non-empty string, got int``. With ``on_bad_record="skip"`` the same errors are
counted by :class:`DataReport` instead and reported once per file and reason at the end of
setup, as :class:`DataWarning` warnings.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from lightning.pytorch.utilities import rank_zero_warn

from dpo_lit.errors import DataError

__all__ = ["DataError", "DataReport", "DataWarning", "OnBadRecord", "describe", "file_of"]

OnBadRecord = Literal["error", "skip"]
SKIP_HINT = " (on_bad_record: skip counts and skips such records)"


class DataWarning(UserWarning):
    """Records skipped or examples dropped while loading data."""


def file_of(source: str) -> str:
    """The file part of a location such as ``data.jsonl:12`` or ``data.json[3]``."""
    for sep in ("[", ":"):
        head, found, tail = source.rpartition(sep)
        if found and head and (sep == "[" or tail.strip().isdigit()):
            return head
    return source


def describe(value: object) -> str:
    """A short description of a wrong value for error messages: its type, or 'an empty string'."""
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    if isinstance(value, list):
        return "an empty list" if not value else "a list"
    return "null" if value is None else type(value).__name__


@dataclass
class DataReport:
    """Counts skipped records (per file and reason) and dropped examples (per file).

    Args:
        on_bad_record: ``"error"`` re-raises the first bad record; ``"skip"`` counts it.
    """

    on_bad_record: OnBadRecord = "error"
    skipped: Counter[tuple[str, str]] = field(default_factory=Counter)
    first_skipped: dict[tuple[str, str], str] = field(default_factory=dict)
    dropped: Counter[str] = field(default_factory=Counter)
    truncated: int = 0  # examples kept with a prompt or completion cut to fit
    formats: dict[str, str] = field(default_factory=dict)  # source -> the format it was read as

    def bad_record(self, error: DataError) -> None:
        """Raise ``error`` or, when skipping, count it under its file and reason."""
        if self.on_bad_record == "error":
            raise DataError(error.source, f"{error.reason}{SKIP_HINT}") from None
        key = (file_of(error.source), error.reason)
        self.skipped[key] += 1
        self.first_skipped.setdefault(key, error.source)

    def summary(self) -> str:
        """What was read, skipped, dropped and cut, in one clause (before :meth:`warn` resets it)."""
        formats = ", ".join(sorted(set(self.formats.values()))) or "none"
        return (f"format {formats}; {sum(self.skipped.values())} bad record(s) skipped, "
                f"{sum(self.dropped.values())} example(s) dropped, {self.truncated} truncated to fit")

    def drop_truncated(self, source: str) -> None:
        """Count an example whose completion was truncated to zero tokens."""
        self.dropped[file_of(source)] += 1

    def messages(self, max_length: int, max_prompt_length: int | None) -> list[str]:
        """One line per (file, reason) skipped and per file with dropped examples."""
        lines = [
            f"{path}: skipped {n} record(s): {reason} (first at {self.first_skipped[(path, reason)]})"
            for (path, reason), n in self.skipped.items()
        ]
        lines += [
            f"{path}: dropped {n} example(s) whose completion was truncated to zero tokens "
            f"(max_length={max_length}, max_prompt_length={max_prompt_length}); "
            "raise max_length or lower max_prompt_length to keep them"
            for path, n in self.dropped.items()
        ]
        return lines

    def warn(self, max_length: int, max_prompt_length: int | None) -> None:
        """Emit each line of :meth:`messages` as a :class:`DataWarning` (rank zero only) and reset."""
        for line in self.messages(max_length, max_prompt_length):
            rank_zero_warn(line, category=DataWarning)
        self.skipped.clear()
        self.first_skipped.clear()
        self.dropped.clear()
        self.truncated = 0
        self.formats.clear()
