"""Mean ± std over finished runs (e.g. seeds) of their metrics.json, as a markdown table.

unirep aggregate runs/seed0 runs/seed1 runs/seed2
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import unirep.layout as layout
from unirep.cli.args import run
from unirep.errors import UnirepError
from unirep.io import read_json
from unirep.pipeline.report import aggregate_runs

PROG = "unirep aggregate"


def main(prog: str = PROG) -> None:
    """Print the table of the run folders named on the command line."""
    folders = [Path(a) for a in sys.argv[1:]]
    if not folders or any(a.startswith("-") for a in sys.argv[1:]):
        raise UnirepError(f"usage: {prog} RUN_DIR [RUN_DIR ...]")
    metrics = [read_json(f / layout.METRICS, what="run metrics") for f in folders]
    print(aggregate_runs(metrics))


def cli(prog: str = PROG) -> None:
    """The console entry point (``unirep aggregate``; the script passes its own name)."""
    run(partial(main, prog), prog)
