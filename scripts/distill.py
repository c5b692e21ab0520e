"""Stage one and two in one command: train missing teachers, then distil the student.

    accelerate launch scripts/distill.py [--config PRESET_OR_PATH] [key=value ...]

With no arguments it runs the embedded ``mini-decathlon`` preset (generated offline on first use);
``--config mini-scenes`` runs the embedded dense multi-task benchmark.
"""

from __future__ import annotations

from typing import Any

from teachers.recipe import ensure_teachers
from unirep.cli import parse_args, run
from unirep.recipe import distill, resolve_data
from unirep.rundir import make_accelerator, prepare_run_dir, run_finished


def summary_line(s: dict[str, Any]) -> str:
    """One line: the student against the baseline and the teachers."""

    def fmt(key: str, spec: str) -> str:
        return "–" if s.get(key) is None else format(s[key], spec)

    line = f"student Δm vs teachers {fmt('delta_m_vs_teachers', '+.2f')} %"
    if "baseline_delta_m_vs_teachers" in s:
        line += f" | baseline {fmt('baseline_delta_m_vs_teachers', '+.2f')} %"
    if "mean_accuracy" in s:
        line += f" | student mean accuracy {fmt('mean_accuracy', '.4f')}"
        if "baseline_mean_accuracy" in s:
            line += f" | baseline {fmt('baseline_mean_accuracy', '.4f')}"
        line += f" | teachers {fmt('teacher_mean_accuracy', '.4f')}"
    return line


def main() -> None:
    cfg = parse_args(prog="distill.py")
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)  # bad data fails before anything is written
    run_dir = prepare_run_dir(cfg, accelerator)
    if run_finished(run_dir):  # resume=true on a finished run: nothing is recomputed or rewritten
        accelerator.print(f"{run_dir} is already finished; nothing to do (its results are kept)")
        return
    accelerator.print(f"run directory: {run_dir}  (processes: {accelerator.num_processes})")
    teacher_seconds = ensure_teachers(cfg, accelerator, data, run_dir)
    metrics = distill(cfg, accelerator, data, run_dir, teacher_seconds)
    accelerator.print(summary_line(metrics["summary"]))
    accelerator.print(f"report: {run_dir / 'report.md'}")
    accelerator.end_training()


if __name__ == "__main__":
    run(main, "distill.py")
