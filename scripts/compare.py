"""Variants × seeds on one preset: one table (mean ± std over seeds) and a plot.

``unirep compare``, see :mod:`unirep.cli.compare`.
"""

from unirep.cli import main

if __name__ == "__main__":
    main(command="compare", prog="compare.py")
