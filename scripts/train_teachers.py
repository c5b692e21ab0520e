"""Stage one alone: train (or verify) one teacher per task (a domain, or a dense task).

accelerate launch scripts/train_teachers.py [--config PRESET_OR_PATH] [key=value ...]
"""

from __future__ import annotations

from teachers.recipe import ensure_teachers
from unirep.cli import parse_args, run
from unirep.recipe import resolve_data
from unirep.rundir import make_accelerator, prepare_run_dir, teacher_root


def main() -> None:
    cfg = parse_args(prog="train_teachers.py")
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)  # bad data fails before anything is written
    run_dir = prepare_run_dir(cfg, accelerator)
    seconds = ensure_teachers(cfg, accelerator, data, run_dir)
    accelerator.print(f"teachers in {teacher_root(cfg)} ({seconds:.1f} s of training this run)")
    accelerator.end_training()


if __name__ == "__main__":
    run(main, "train_teachers.py")
