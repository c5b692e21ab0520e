"""unirep: universal representations by distillation (multi-domain and multi-task).

The Python API, loaded on first use so that ``import unirep`` stays short of the training stack:

- :func:`run` runs the whole recipe (stage one's missing teachers, then stage two: baseline,
  student, evaluation, export, report) as ``unirep distill`` does, and returns a
  :class:`RunResult`;
- :func:`load_student` reads an exported ``student/`` folder as a :class:`Student` (predict,
  features, evaluate).

Importing ``unirep`` registers its own architectures with timm (``resnet26_decathlon``,
``resnet_decathlon_tiny``, ``segnet_mtan``), so an exported ``student/backbone/`` loads with
``timm.create_model`` (see :mod:`unirep.pipeline.export`).
"""

from __future__ import annotations

import importlib
from typing import Any

from unirep.models import resnet_decathlon, segnet  # noqa: F401  (timm registrations)
from unirep.version import __version__

__all__ = ["RunResult", "Student", "__version__", "load_student", "run"]

# imported on first use; their types for checkers are in __init__.pyi
_API = {
    "RunResult": "unirep.pipeline.api",
    "run": "unirep.pipeline.api",
    "Student": "unirep.pipeline.student",
    "load_student": "unirep.pipeline.student",
}


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (module ``__getattr__``, PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module 'unirep' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
