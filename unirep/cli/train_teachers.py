"""Stage one alone: train (or verify) one teacher per task (a domain, or a dense task).

accelerate launch scripts/train_teachers.py [--config PRESET_OR_PATH] [key=value ...]
unirep train-teachers [--config PRESET_OR_PATH] [key=value ...]    (the installed equivalent)
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from unirep.cli.args import parse_args, run
from unirep.pipeline.rundir import check_output_dir, make_accelerator, prepare_run_dir
from unirep.pipeline.stage_two import resolve_data
from unirep.stage_one.train import ensure_teachers
from unirep.teachers.store import teacher_root

PROG = "unirep train-teachers"


def main(prog: str = PROG) -> None:
    cfg = parse_args(prog=prog)
    check_output_dir(Path(cfg.output_dir) / cfg.name if cfg.name else Path(cfg.output_dir))
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)  # bad data fails before anything is written
    run_dir = prepare_run_dir(cfg, accelerator)
    seconds = ensure_teachers(cfg, accelerator, data, run_dir)
    accelerator.print(f"teachers in {teacher_root(cfg)} ({seconds:.1f} s of training this run)")
    accelerator.end_training()


def cli(prog: str = PROG) -> None:
    """The console entry point (``unirep train-teachers``; the script passes its own name)."""
    run(partial(main, prog), prog)
