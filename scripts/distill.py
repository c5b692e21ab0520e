"""Stage one and two in one command: train missing teachers, then distil the student.

    accelerate launch scripts/distill.py [--config PRESET_OR_PATH] [key=value ...]

With no arguments it runs the embedded ``mini-decathlon`` preset (generated offline on first use).
"""

from __future__ import annotations

from teachers.classification import ensure_teachers
from unirep.cli import parse_args, run
from unirep.pipeline import distill, make_accelerator, prepare_run_dir, resolve_domains


def main() -> None:
    cfg = parse_args(prog="distill.py")
    accelerator = make_accelerator(cfg)
    domains = resolve_domains(cfg, accelerator)  # bad data fails before anything is written
    run_dir = prepare_run_dir(cfg, accelerator)
    accelerator.print(f"run directory: {run_dir}  (processes: {accelerator.num_processes})")
    teacher_seconds = ensure_teachers(cfg, accelerator, domains, run_dir)
    metrics = distill(cfg, accelerator, domains, run_dir, teacher_seconds)
    s = metrics["summary"]
    accelerator.print(
        f"student mean accuracy {s['mean_accuracy']:.4f}"
        + (
            f" | baseline {s['baseline_mean_accuracy']:.4f}"
            if "baseline_mean_accuracy" in s
            else ""
        )
        + f" | teachers {s['teacher_mean_accuracy']:.4f} | score {s['decathlon_score']:.0f}"
    )
    accelerator.print(f"report: {run_dir / 'report.md'}")
    accelerator.end_training()


if __name__ == "__main__":
    run(main, "distill.py")
