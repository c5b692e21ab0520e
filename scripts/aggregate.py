"""Mean ± std over finished runs' metrics.json, as a markdown table.

``unirep aggregate``, see :mod:`unirep.cli.aggregate`.
"""

from unirep.cli import main

if __name__ == "__main__":
    main(command="aggregate", prog="aggregate.py")
