"""Stage one (missing teachers) and two (baseline, student, evaluation, report).

``unirep distill``, see :mod:`unirep.cli.distill`.
"""

from unirep.cli import main

if __name__ == "__main__":
    main(command="distill", prog="distill.py")
