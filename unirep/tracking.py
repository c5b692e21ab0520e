"""Training logs: one long-format CSV per phase (``step,series,value``), read back for reports."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from unirep.faults import ENV, failpoint
from unirep.io import atomic_write_text

Curves = dict[str, dict[str, list[tuple[int, float]]]]
"""``{phase: {series: [(step, value), ...]}}``, as :func:`read_curves` returns them."""

WeightingCurves = dict[str, dict[str, dict[str, list[tuple[int, float]]]]]
"""``{phase: {"weight": {task: points}, "gradcos": {"<a>~<b>": points}}}``
(:func:`weighting_curves`)."""


class CSVLog:
    """Appends ``step,series,value`` rows to ``<log_dir>/<phase>.csv`` (main process only).

    On resume, rows after the resumed step are dropped first, so curves never repeat steps.
    """

    def __init__(self, log_dir: Path, phase: str, enabled: bool, resume_step: int = 0) -> None:
        self.path = Path(log_dir) / f"{phase.replace('/', '-')}.csv"
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_log(self.path) if self.path.exists() else []
        kept = [r for r in rows if r[0] <= resume_step] if resume_step else []
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(["step", "series", "value"])
        writer.writerows([s, k, f"{v:.6g}"] for s, k, v in kept)
        atomic_write_text(self.path, text.getvalue())  # a kill here keeps the old log whole

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        rows = [[step, k, f"{v:.6g}"] for k, v in values.items()]
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if os.environ.get(ENV) == f"log:{self.path.stem}:{step}":  # a torn row, then killed
                f.write(f"{step},{rows[0][1][:3]}")
                f.flush()
                failpoint(f"log:{self.path.stem}:{step}")
            writer.writerows(rows)


def read_log(path: Path) -> list[tuple[int, str, float]]:
    """Rows of a phase log."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        rows = []
        for row in reader:
            try:
                step, name, value = row
                rows.append((int(step), name, float(value)))
            except ValueError:  # a row torn by a kill: never read (resume drops it)
                continue
        return rows


def read_curves(log_dir: Path) -> Curves:
    """``{phase: {series: [(step, value)]}}`` from every CSV in ``log_dir``."""
    curves: Curves = {}
    for path in sorted(Path(log_dir).glob("*.csv")):
        phase = path.stem
        for step, series, value in read_log(path):
            curves.setdefault(phase, {}).setdefault(series, []).append((step, value))
    return curves


WEIGHTING_TERMS: tuple[str, ...] = ("weight", "gradcos", "dominance")
"""Per-task terms of the task-balancing method: ``train/weight/<task>`` (effective loss weight),
``train/gradcos/<a>~<b>`` (cosine between two tasks' shared gradients) and
``train/dominance/<layer>/<task>`` (a task's share of a shared layer's accumulated update,
:mod:`unirep.diagnostics`). They are per task, pair or layer by nature, so :func:`report_curves`
never averages them; :func:`weighting_curves` keeps them apart."""


def report_curves(curves: Curves) -> Curves:
    """The curves a report plots: per-task terms averaged over tasks, plus val scores and lr.

    ``train/<term>/<task>`` series become ``train/<term> (task mean)``, so teachers (one task) and
    multi-task students are on the same scale. The task-balancing terms (:data:`WEIGHTING_TERMS`)
    are left out: a mean of task weights or of pairwise gradient cosines says nothing; see
    :func:`weighting_curves`.
    """
    out: Curves = {}
    for phase, series in curves.items():
        grouped: dict[str, dict[int, list[float]]] = {}
        for name, points in series.items():
            parts = name.split("/")
            if len(parts) == 3 and parts[0] == "train":
                if parts[1] in WEIGHTING_TERMS:
                    continue
                key = f"train/{parts[1]} (task mean)"
            elif name.startswith("val/") or name == "train/lr":
                key = name
            else:
                continue
            for step, value in points:
                grouped.setdefault(key, {}).setdefault(step, []).append(value)
        out[phase] = {
            key: [(s, sum(v) / len(v)) for s, v in sorted(by_step.items())]
            for key, by_step in sorted(grouped.items())
        }
    return out


def weighting_curves(curves: Curves) -> WeightingCurves:
    """The task-balancing series of each phase, one curve per task or task pair, not averaged.

    Returns:
        ``{phase: {"weight": {task: [(step, value)]}, "gradcos": {"<a>~<b>": [(step, value)]},
        "dominance": {"<layer>/<task>": [(step, value)]}}}`` from the ``train/<term>/...``
        series, points sorted by step. Only phases that logged at least one point appear; every
        key is present (an empty dict when the run logs no such term).
    """
    out: WeightingCurves = {}
    for phase, series in curves.items():
        terms: dict[str, dict[str, list[tuple[int, float]]]] = {t: {} for t in WEIGHTING_TERMS}
        for name, points in series.items():
            parts = name.split("/", 2)
            if len(parts) == 3 and parts[0] == "train" and parts[1] in terms and points:
                terms[parts[1]][parts[2]] = sorted(points)
        if any(terms.values()):
            out[phase] = {term: dict(sorted(by.items())) for term, by in terms.items()}
    return out
