"""Stage one and two in one command: train missing teachers, then distil the student.

    accelerate launch scripts/distill.py [--config PRESET_OR_PATH] [key=value ...]

With no arguments it runs the embedded ``mini-decathlon`` preset (generated offline on first use);
``--config mini-scenes`` runs the embedded dense multi-task benchmark.
"""

from __future__ import annotations

from typing import Any

from unirep.cli import parse_args, run
from unirep.config import Config
from unirep.pipeline import make_accelerator, prepare_run_dir


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def classification(cfg: Config) -> None:
    from teachers.classification import ensure_teachers
    from unirep.pipeline import distill, resolve_domains

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


def dense(cfg: Config) -> None:
    from teachers.dense import ensure_dense_teachers
    from unirep.dense_pipeline import distill_dense, resolve_dense_data

    accelerator = make_accelerator(cfg)
    data = resolve_dense_data(cfg, accelerator)  # bad data fails before anything is written
    run_dir = prepare_run_dir(cfg, accelerator)
    accelerator.print(f"run directory: {run_dir}  (processes: {accelerator.num_processes})")
    teacher_seconds = ensure_dense_teachers(cfg, accelerator, data, run_dir)
    metrics = distill_dense(cfg, accelerator, data, run_dir, teacher_seconds)
    s = metrics["summary"]
    line = f"student Δm vs teachers {_fmt(s.get('delta_m_vs_teachers'), '+.2f')} %"
    if "baseline_delta_m_vs_teachers" in s:
        line += f" | baseline {_fmt(s['baseline_delta_m_vs_teachers'], '+.2f')} %"
    accelerator.print(line)
    accelerator.print(f"report: {run_dir / 'report.md'}")
    accelerator.end_training()


def main() -> None:
    cfg = parse_args(prog="distill.py")
    (dense if cfg.dense is not None else classification)(cfg)


if __name__ == "__main__":
    run(main, "distill.py")
