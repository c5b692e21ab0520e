"""Evaluate an exported student on a split; writes metrics.json in the run-directory format.

accelerate launch scripts/evaluate.py --config PRESET student=runs/<run>/student split=test
"""

from __future__ import annotations

from pathlib import Path

from unirep.cli import parse_args, run
from unirep.recipe import evaluate_student, resolve_data
from unirep.rundir import make_accelerator, prepare_run_dir


def main() -> None:
    cfg = parse_args(prog="evaluate.py")
    if not cfg.student:
        raise SystemExit("evaluate.py: set student=<run folder or its student/ folder>")
    student_dir = Path(cfg.student)
    if (student_dir / "student").is_dir():
        student_dir = student_dir / "student"
    if not (student_dir / "manifest.json").is_file():
        raise SystemExit(f"evaluate.py: {str(student_dir)!r} holds no student manifest.json")
    cfg.name = cfg.name or f"eval-{student_dir.resolve().parent.name}-{cfg.split}"
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)  # bad data fails before anything is written
    run_dir = prepare_run_dir(cfg, accelerator)
    metrics = evaluate_student(cfg, accelerator, data, run_dir, student_dir)
    for task, entry in metrics["tasks"].items():
        values = ", ".join(f"{k} {v:.4f}" for k, v in entry["student"].items() if v is not None)
        accelerator.print(f"{task}: {values or 'not measured (unlabelled split)'}")
    accelerator.print(f"metrics: {run_dir / 'metrics.json'}")


if __name__ == "__main__":
    run(main, "evaluate.py")
