"""Mean ± std over finished runs (e.g. seeds) of their metrics.json, as a markdown table.

python scripts/aggregate.py runs/seed0 runs/seed1 runs/seed2
"""

from __future__ import annotations

import sys
from pathlib import Path

from unirep.io import read_json
from unirep.report import aggregate_runs


def main() -> None:
    folders = [Path(a) for a in sys.argv[1:]]
    if not folders or any(a.startswith("-") for a in sys.argv[1:]):
        raise SystemExit("usage: aggregate.py RUN_DIR [RUN_DIR ...]")
    metrics = [read_json(f / "metrics.json", what="run metrics") for f in folders]
    print(aggregate_runs(metrics))


if __name__ == "__main__":
    main()
