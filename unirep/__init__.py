"""unirep: universal representations by distillation (multi-domain and multi-task).

The Python API (loaded on first use, so ``import unirep`` stays short of the training stack):
:func:`load_student` reads an exported ``student/`` folder as a :class:`Student` (predict,
features, evaluate). Importing ``unirep`` registers its own architectures with timm
(``resnet26_decathlon``, ``resnet_decathlon_tiny``, ``segnet_mtan``), so an exported
``student/backbone/`` loads with ``timm.create_model`` (see :mod:`unirep.export`). The whole
recipe (teachers, then the student) runs from Python through :func:`teachers.run`, in the package
beside this one (``unirep`` never imports it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from unirep.models import resnet_decathlon, segnet  # noqa: F401  (timm registrations)
from unirep.version import __version__

if TYPE_CHECKING:
    from unirep.student import Student, load_student

__all__ = ["Student", "__version__", "load_student"]

_API = ("Student", "load_student")  # in unirep.student


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (module ``__getattr__``, PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module 'unirep' has no attribute {name!r}")
    from unirep import student

    return getattr(student, name)
