"""The installed commands, one module per command, each with ``main`` and a console entry point
``cli`` (``[project.scripts]`` in ``pyproject.toml``): ``unirep-distill``,
``unirep-train-teachers``, ``unirep-evaluate``, ``unirep-benchmark``, ``unirep-compare``. The
repository's ``scripts/*.py`` call the same ``cli`` (``accelerate launch scripts/distill.py``).

They live here, beside stage one, because most of them run it and ``unirep`` never imports this
package; a command is a thin shell over the library (and :func:`teachers.pipeline.run`).
"""
