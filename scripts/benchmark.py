"""Time the real training step against a minimal loop; split a phase into its parts.

``unirep benchmark``, see :mod:`unirep.cli.benchmark`.
"""

from unirep.cli import main

if __name__ == "__main__":
    main(command="benchmark", prog="benchmark.py")
