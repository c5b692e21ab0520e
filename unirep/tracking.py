"""Training logs: one long-format CSV per phase (``step,series,value``), read back for reports."""

from __future__ import annotations

import csv
from pathlib import Path


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
        with open(self.path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "series", "value"])
            writer.writerows(kept)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerows([step, k, f"{v:.6g}"] for k, v in values.items())


def read_log(path: Path) -> list[tuple[int, str, float]]:
    """Rows of a phase log."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        return [(int(s), name, float(v)) for s, name, v in reader]


def read_curves(log_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{phase: {series: [(step, value)]}}`` from every CSV in ``log_dir``."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for path in sorted(Path(log_dir).glob("*.csv")):
        phase = path.stem
        for step, series, value in read_log(path):
            curves.setdefault(phase, {}).setdefault(series, []).append((step, value))
    return curves


def report_curves(
    curves: dict[str, dict[str, list[tuple[int, float]]]],
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """The curves a report plots: per-domain terms averaged over domains, plus val accuracy and lr.

    ``train/<term>/<domain>`` series become ``train/<term> (domain mean)``, so teachers (one
    domain) and multi-domain students are on the same scale.
    """
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for phase, series in curves.items():
        grouped: dict[str, dict[int, list[float]]] = {}
        for name, points in series.items():
            parts = name.split("/")
            if len(parts) == 3 and parts[0] == "train":
                key = f"train/{parts[1]} (domain mean)"
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
