"""Types of the public API that ``unirep/__init__.py`` imports on first use."""

from unirep.pipeline.api import RunResult as RunResult
from unirep.pipeline.api import run as run
from unirep.pipeline.student import Student as Student
from unirep.pipeline.student import load_student as load_student
from unirep.version import __version__ as __version__

__all__ = ["RunResult", "Student", "__version__", "load_student", "run"]
