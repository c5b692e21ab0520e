"""Every error type of unirep, in one place.

Every configuration, data, teacher or training fault a user can cause or meet is a
:class:`UnirepError`, which the commands print as one line (no traceback). Each concrete error
keeps the built-in base a caller would naturally catch (``ValueError`` for a bad value,
``FileNotFoundError`` for a missing file), so library users can use either.
"""

from __future__ import annotations


class UnirepError(Exception):
    """Base of every user-facing error; its message names the key or file and what is valid."""


class ConfigError(UnirepError, ValueError):
    """A config key, type or value is wrong; the message names it and what was expected."""


class DataError(UnirepError, ValueError):
    """A data file or annotation is missing, malformed or inconsistent; the message names it."""


class DataRootError(UnirepError, FileNotFoundError):
    """The data root, an annotation file or a listed image is missing."""


class CorruptImageError(UnirepError, OSError):
    """An image file exists but cannot be decoded."""


class TeacherMismatchError(UnirepError, ValueError):
    """A teacher checkpoint does not fit the run (domain, classes, architecture, data, weights),
    or is damaged (a manifest that is not JSON, weights that fail their hash)."""


class StudentError(UnirepError, ValueError):
    """An exported student does not load: its manifest is not JSON or lacks an entry, its
    weights fail their hash or do not fit the architecture and tasks it records, or its format
    or architecture is unknown; the message names the file."""


class MissingFileError(UnirepError, FileNotFoundError):
    """A file unirep wrote earlier is gone (a cached teacher's or an exported student's manifest
    or weights); the message names it and what to do."""


class NonFiniteError(UnirepError, FloatingPointError):
    """A loss, gradient, weight or score is NaN or infinite; the message names it and the step."""


class UnknownNameError(KeyError):
    """A registry was asked for a name it does not hold (the message lists the valid ones).

    A ``KeyError`` (a lookup miss) rather than a :class:`UnirepError`: configuration names are
    checked at start-up, where it becomes a :class:`ConfigError` naming the key."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])
