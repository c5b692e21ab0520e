"""Training logs: one long-format CSV per phase (``step,series,value``), read back for reports,
and the same series forwarded to the experiment trackers that ``log_with`` names.

Trackers go through accelerate's tracking API (:func:`unirep.pipeline.rundir.make_accelerator` and
:func:`unirep.pipeline.rundir.start_trackers`); they only see what the CSV logs hold, under the
phase's name (``student/train/loss`` at the student's step), plus the final metrics (``final/...``).
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

from unirep.errors import ConfigError
from unirep.faults import ENV, failpoint
from unirep.io import atomic_write_text

Curves = dict[str, dict[str, list[tuple[int, float]]]]
"""``{phase: {series: [(step, value), ...]}}``, as :func:`read_curves` returns them."""

WeightingCurves = dict[str, dict[str, dict[str, list[tuple[int, float]]]]]
"""``{phase: {"weight": {task: points}, "gradcos": {"<a>~<b>": points}}}``
(:func:`weighting_curves`)."""


TRACKERS: dict[str, Callable[[], bool]] = {
    "tensorboard": is_tensorboard_available,
    "wandb": is_wandb_available,
    "mlflow": is_mlflow_available,
}
"""The experiment trackers ``log_with`` may name (accelerate's names), and whether each one's
package is installed; each is the pip extra of the same name (``unirep[tensorboard]``)."""

LOG_WITH: tuple[str, ...] = ("none", *TRACKERS, "all")
"""The values of the config key ``log_with`` (``all``: every tracker of :data:`TRACKERS` that is
installed)."""

PROJECT = "unirep"
"""The trackers' project: the TensorBoard folder under ``<run>/logs/``, the wandb project, the
MLflow experiment. Each run is named after its run folder."""


def tracker_names(log_with: str) -> list[str]:
    """The trackers ``log_with`` asks for, each one installed; ``[]`` for ``none``.

    Raises:
        ConfigError: a named tracker's package is missing (or, for ``all``, every one is), naming
            the key and the pip extra to install.
    """
    if log_with == "none":
        return []
    if log_with == "all":
        found = [name for name, available in TRACKERS.items() if available()]
        if not found:
            raise ConfigError(
                f"config key 'log_with': 'all' found none of {', '.join(TRACKERS)} installed; "
                "install one, e.g. pip install 'unirep[tensorboard]'"
            )
        return found
    if log_with not in TRACKERS:
        raise ConfigError(
            f"config key 'log_with': {log_with!r} is not valid; choices: {', '.join(LOG_WITH)}"
        )
    if not TRACKERS[log_with]():
        raise ConfigError(
            f"config key 'log_with': {log_with!r} is not installed; install it with pip install "
            f"'unirep[{log_with}]' (or set log_with=none)"
        )
    return [log_with]


_MLFLOW_UNSAFE = re.compile(r"[^\w/.\- :]")  # MLflow refuses other characters in metric names


class TrackerLog:
    """Forwards one phase's series to the run's experiment trackers, named ``<prefix>/<series>``
    at the phase's own step (``student/train/loss`` at step 40).

    The trackers are the accelerator's (started by :func:`unirep.pipeline.rundir.start_trackers`, on
    the main process only), so this does nothing elsewhere or without ``log_with``. It calls each
    tracker rather than ``accelerator.log``, which gives every tracker the same step: wandb drops
    points whose step is below one it has seen, and every phase counts from 1, so wandb gets the
    step as its own series per phase (``student/step``, the x axis of ``student/*``); MLflow gets
    names cleared of the characters it refuses (``~`` of ``gradcos/<a>~<b>`` becomes ``_``).
    """

    def __init__(self, accelerator: Any, prefix: str) -> None:
        self.prefix = prefix
        self.trackers = list(getattr(accelerator, "trackers", []))
        for tracker in self.trackers:
            if tracker.name == "wandb":
                run = tracker.tracker
                run.define_metric(f"{prefix}/step")
                run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")

    def log(self, step: int, values: dict[str, float]) -> None:
        """Log ``values`` (series name → number) at ``step``."""
        named = {f"{self.prefix}/{k}": float(v) for k, v in values.items()}
        for tracker in self.trackers:
            if tracker.name == "wandb":
                tracker.log({**named, f"{self.prefix}/step": step})
            elif tracker.name == "mlflow":
                tracker.log({_MLFLOW_UNSAFE.sub("_", k): v for k, v in named.items()}, step=step)
            else:
                tracker.log(named, step=step)


def final_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``metrics.json``, by path: ``summary/<key>`` (nested keys joined by
    ``/``, e.g. ``summary/params/student``) and ``tasks/<task>/<role>/<metric>``. Strings, lists,
    booleans and missing values (``null``) are left out."""
    flat: dict[str, float] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}/{key}")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[path] = float(value)

    for section in ("summary", "tasks"):
        for key, value in metrics.get(section, {}).items():
            walk(value, f"{section}/{key}")
    return flat


def log_final_metrics(accelerator: Any, metrics: dict[str, Any], step: int) -> None:
    """Send the numbers of ``metrics`` (:func:`final_values`) to the trackers as ``final/...`` at
    ``step`` (the student's last step; 0 for an evaluation)."""
    TrackerLog(accelerator, "final").log(step, final_values(metrics))


class CSVLog:
    """Appends ``step,series,value`` rows to ``<log_dir>/<phase>.csv`` (main process only), and
    sends the same values to ``trackers`` (:class:`TrackerLog`) when given.

    On resume, rows after the resumed step are dropped first, so curves never repeat steps (the
    trackers cannot drop what they were sent: they get those steps again, with the same values,
    since a resumed run repeats its steps exactly).
    """

    def __init__(
        self,
        log_dir: Path,
        phase: str,
        enabled: bool,
        resume_step: int = 0,
        trackers: TrackerLog | None = None,
    ) -> None:
        self.path = Path(log_dir) / f"{phase.replace('/', '-')}.csv"
        self.enabled = enabled
        self.trackers = trackers
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
        if self.trackers is not None:  # after the CSV row: the report's record comes first
            self.trackers.log(step, values)


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
:mod:`unirep.training.diagnostics`). They are per task, pair or layer by nature, so
:func:`report_curves` never averages them; :func:`weighting_curves` keeps them apart."""


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
