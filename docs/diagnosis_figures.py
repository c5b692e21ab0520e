"""The figures of docs/diagnosis.md, drawn from finished runs (``runs/<name>/``).

python docs/diagnosis_figures.py curves RUN OUT.png
    per-domain (or per-task) training task loss of the teachers, the baseline and the
    student against the images of that domain seen, and validation curves, from the CSV
    logs of one run that trained its own teachers (a run from an empty teacher cache)
python docs/diagnosis_figures.py tradeoff OUT.png LABEL=MINUTES=RUN[,RUN...] ...
    student − baseline and student − teachers (mean over the runs, one bar per seed) against
    the minutes the recipe takes from an empty cache
python docs/diagnosis_figures.py schedule OUT.png LINE=STEPS=RUN[@BASE] ...
    student − baseline and student − teachers against the student's (and baseline's) steps,
    one line per LINE (e.g. one per teacher budget)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from unirep.training.tracking import read_curves


def curves(run: Path, out: Path) -> None:
    config = (run / "config.yaml").read_text()
    batch = int(config.split("batch_size:", 1)[1].split()[0])
    logs = read_curves(run / "logs")  # {phase: {series: points}}, phases named by file
    phases = {"baseline": logs["baseline"], "student": logs["student"]}
    tasks = sorted(k.split("/", 2)[2] for k in phases["student"] if k.startswith("train/task/"))
    teachers = {t: logs[f"teacher-{t}"] for t in tasks if f"teacher-{t}" in logs}
    cols = 4
    rows = (len(tasks) + 1 + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    colours = {"teacher": "tab:green", "baseline": "tab:blue", "student": "tab:orange"}
    for ax, task in zip(axes.flat, tasks, strict=False):
        lines = {"teacher": teachers.get(task, {}).get(f"train/task/{task}", [])}
        lines |= {p: s.get(f"train/task/{task}", []) for p, s in phases.items()}
        for role, points in lines.items():
            if points:
                ax.plot([s * batch for s, _ in points], [v for _, v in points], label=role,
                        color=colours[role])  # fmt: skip
        ax.set_yscale("log")
        ax.set_title(f"{task}: training task loss")
        ax.set_xlabel(f"{task} training images seen")
        ax.legend(fontsize=7)
    ax = axes.flat[len(tasks)]
    for role, series in phases.items():
        key = next((k for k in series if k.startswith("val/")), None)
        if key:
            ax.plot(*zip(*series[key], strict=True), marker=".", label=role, color=colours[role])
            ax.set_title(f"validation ({key[4:]})")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks) + 1 :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def _gaps(spec: str) -> tuple[float, float]:
    """(student − baseline, student − teachers) of ``RUN``, or ``RUN@BASE`` for a student-only
    run (``baseline=false``) whose baseline is the one of run ``BASE``."""
    run, _, base = spec.partition("@")
    s = json.loads((Path(run) / "metrics.json").read_text())["summary"]
    b = json.loads((Path(base or run) / "metrics.json").read_text())["summary"]
    if s.get("mean_accuracy") is not None:
        return (100 * (s["mean_accuracy"] - b["baseline_mean_accuracy"]),
                100 * (s["mean_accuracy"] - s["teacher_mean_accuracy"]))  # fmt: skip
    return s["delta_m_vs_teachers"] - b["baseline_delta_m_vs_teachers"], s["delta_m_vs_teachers"]


def tradeoff(out: Path, specs: list[str]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for spec in specs:
        label, minutes, runs = spec.split("=", 2)
        gaps = [_gaps(r) for r in runs.split(",")]
        for ax, values in zip(axes, zip(*gaps, strict=True), strict=True):
            x = float(minutes)
            ax.scatter([x] * len(values), values, s=12, alpha=0.5)
            ax.errorbar([x], [statistics.fmean(values)], fmt="o", color="black")
            ax.annotate(label, (x, statistics.fmean(values)), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")  # fmt: skip
    for ax, title in zip(axes, ("student − baseline", "student − teachers"), strict=True):
        ax.axhline(0, color="grey", lw=0.8)
        ax.margins(x=0.3)
        ax.set_title(f"{title} (points; a dot per run, black: the mean)")
        ax.set_xlabel("minutes from an empty cache (2 cores, one thread per run)")
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def schedule(out: Path, specs: list[str]) -> None:
    lines: dict[str, list[tuple[int, tuple[float, float]]]] = {}
    for spec in specs:
        label, steps, run = spec.split("=", 2)
        lines.setdefault(label, []).append((int(steps), _gaps(run)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for label, points in lines.items():
        points.sort()
        for i, ax in enumerate(axes):
            ax.plot([s for s, _ in points], [g[i] for _, g in points], marker="o", label=label)
    for ax, title in zip(axes, ("student − baseline", "student − teachers"), strict=True):
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(3, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{title} (Δm points, test; dashed: the goal)")
        ax.set_xlabel("student and baseline steps")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    if sys.argv[1] == "curves":
        curves(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1] == "schedule":
        schedule(Path(sys.argv[2]), sys.argv[3:])
    else:
        tradeoff(Path(sys.argv[2]), sys.argv[3:])
