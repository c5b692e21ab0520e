"""unirep: universal representations by distillation (multi-domain and multi-task).

The Python API, loaded on first use so that ``import unirep`` stays short of the training stack:

- :func:`run` runs the whole recipe (stage one's missing teachers, then stage two: baseline,
  student, evaluation, export, report) as ``unirep distill`` does, and returns a
  :class:`RunResult`;
- :func:`load_student` reads an exported ``student/`` folder as a :class:`Student` (predict,
  features, evaluate).

Importing ``unirep`` registers its own architectures with timm (``resnet26_decathlon``,
``resnet_decathlon_tiny``, ``segnet_mtan``), so an exported ``student/backbone/`` loads with
``timm.create_model`` (see :mod:`unirep.pipeline.export`); the registration happens when timm is
imported, so ``import unirep`` itself does not load torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

from unirep.version import __version__

_ARCHITECTURES = ("unirep.models.resnet_decathlon", "unirep.models.segnet")


def _register_architectures() -> None:
    """Register unirep's architectures with timm (importing their modules does it)."""
    for name in _ARCHITECTURES:
        importlib.import_module(name)


class _AfterTimm(importlib.abc.MetaPathFinder):
    """Registers unirep's architectures right after ``timm`` is imported, so that ``import
    unirep`` stays light (``unirep --help`` answers without torch) while ``import unirep; import
    timm; timm.create_model("local-dir:...")`` finds them."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "timm":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterTimm)]
            _register_architectures()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if "timm" in sys.modules:
    _register_architectures()
elif not any(isinstance(f, _AfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTimm())

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
