"""The project's own error types: every configuration, data, teacher or training fault a user can
cause or meet is a :class:`UnirepError`, which the scripts print as one line (no traceback).

Each concrete error keeps the built-in base a caller would naturally catch (``ValueError`` for a bad
value, ``FileNotFoundError`` for a missing file), so library users can use either.
"""

from __future__ import annotations


class UnirepError(Exception):
    """Base of every user-facing error; its message names the key or file and what is valid."""


class DataError(UnirepError, ValueError):
    """A data file or annotation is missing, malformed or inconsistent; the message names it."""


class NonFiniteError(UnirepError, FloatingPointError):
    """A loss, gradient, weight or score is NaN or infinite; the message names it and the step."""
