"""Stage one: teacher recipes, one per benchmark family; the whole recipe as functions
(:func:`run`, from :mod:`teachers.pipeline`); the installed commands (:mod:`teachers.commands`).
``unirep`` never imports this package.

    from teachers import run
    result = run("mini-decathlon", ["train.max_steps=100"])   # what scripts/distill.py does
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from teachers.pipeline import RunResult, run

__all__ = ["RunResult", "run"]


def __getattr__(name: str) -> Any:
    """:func:`run` and :class:`RunResult`, imported on first use (PEP 562)."""
    if name not in __all__:
        raise AttributeError(f"module 'teachers' has no attribute {name!r}")
    from teachers import pipeline

    return getattr(pipeline, name)
