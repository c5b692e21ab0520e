"""Evaluate an exported student on a split (writes metrics.json).

``unirep evaluate``, see :mod:`unirep.cli.evaluate`.
"""

from unirep.cli import main

if __name__ == "__main__":
    main(command="evaluate", prog="evaluate.py")
