"""Stage one and two in one command: train missing teachers, then distil the student.

    accelerate launch scripts/distill.py [--config PRESET_OR_PATH] [key=value ...]

With no arguments it runs the embedded ``mini-decathlon`` preset (generated offline on first use);
``--config mini-scenes`` runs the embedded dense multi-task benchmark.
"""

from __future__ import annotations

from typing import Any

from unirep.cli import parse_args, run
from unirep.pipeline import make_accelerator, prepare_run_dir


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def classification_line(s: dict[str, Any]) -> str:
    baseline = s.get("baseline_mean_accuracy")
    return (
        f"student mean accuracy {s['mean_accuracy']:.4f}"
        + (f" | baseline {baseline:.4f}" if "baseline_mean_accuracy" in s else "")
        + f" | teachers {s['teacher_mean_accuracy']:.4f} | score {s['decathlon_score']:.0f}"
    )


def dense_line(s: dict[str, Any]) -> str:
    line = f"student Δm vs teachers {_fmt(s.get('delta_m_vs_teachers'), '+.2f')} %"
    if "baseline_delta_m_vs_teachers" in s:
        line += f" | baseline {_fmt(s['baseline_delta_m_vs_teachers'], '+.2f')} %"
    return line


def main() -> None:
    cfg = parse_args(prog="distill.py")
    if cfg.dense is not None:
        from teachers.dense import ensure_dense_teachers as ensure
        from unirep.dense_pipeline import distill_dense as stage_two
        from unirep.dense_pipeline import resolve_dense_data as resolve

        summary_line = dense_line
    else:
        from teachers.classification import ensure_teachers as ensure
        from unirep.pipeline import distill as stage_two
        from unirep.pipeline import resolve_domains as resolve

        summary_line = classification_line
    accelerator = make_accelerator(cfg)
    data = resolve(cfg, accelerator)  # bad data fails before anything is written
    run_dir = prepare_run_dir(cfg, accelerator)
    accelerator.print(f"run directory: {run_dir}  (processes: {accelerator.num_processes})")
    teacher_seconds = ensure(cfg, accelerator, data, run_dir)
    metrics = stage_two(cfg, accelerator, data, run_dir, teacher_seconds)
    accelerator.print(summary_line(metrics["summary"]))
    accelerator.print(f"report: {run_dir / 'report.md'}")
    accelerator.end_training()


if __name__ == "__main__":
    run(main, "distill.py")
