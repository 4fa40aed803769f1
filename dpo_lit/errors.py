"""The mistakes a user can make, as exceptions the CLI turns into one line and exit status 2.

Everything else (a bug, a library failing) keeps its traceback. Raise a :class:`UserError`
subclass only where the message names what the user should change: the file and line of a bad
record, or the config key of a bad value.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's data, files or configuration; its message is the whole report."""


class ConfigError(UserError, ValueError):
    """A bad configuration value. The message starts with the key: ``model.reference: ...``."""


class DataError(UserError, ValueError):
    """A record (or a whole file) that cannot be used.

    Args:
        source: Where: ``path:line`` (or ``path[index]``), or just the path.
        reason: What is wrong, without the location: ``field 'chosen': expected ...``.
    """

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self) -> tuple[type[DataError], tuple[str, str]]:
        return type(self), (self.source, self.reason)  # picklable across DataLoader workers


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the configuration names does not exist; the message names it."""


class OutputError(UserError, OSError):
    """A file that cannot be written (a full disk, a folder without write permission); the
    message names it and says why."""

    def __init__(self, path, error: OSError) -> None:
        super().__init__(f"{path}: cannot write: {error.strerror or error}")
