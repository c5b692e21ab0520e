"""SRDML's learned task relation in a run's outputs: ``metrics.json``'s ``summary.saliency``
and the report's section with :data:`~unirep.layout.SALIENCY_FIGURE`.

The relation ``c`` (:class:`~unirep.losses.saliency.SaliencyRelations`) is training state of the
student's objective, not of the exported network: the record takes it from the objective when
this process trained the phase, else (a finished phase reloaded on resume) from the last row of
the student's log, ``train/srdml/relation/<u>-<v>``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

import unirep.layout as layout
from unirep.io import atomic_write_bytes
from unirep.training.tracking import read_log

__all__ = ["saliency_record", "saliency_section"]

TERM = "srdml"  # the joint term's name in the objective and in the logs
RELATION = f"train/{TERM}/relation/"
DISTANCE = f"train/{TERM}/distance/"


def saliency_record(module: nn.Module, log_path: Path) -> dict[str, Any] | None:
    """``summary.saliency`` of the student's trainable ``module`` (None without SRDML): the
    term's settings and its relation per pair and as a matrix (``step``: the step it is from)."""
    joint = getattr(getattr(module, "objective", None), "joint", {})
    if TERM not in joint:
        return None
    term = joint[TERM]
    if term.updates > 0:
        return {**term.record(), "source": "objective"}
    rows = read_log(log_path) if Path(log_path).is_file() else []
    logged = {
        name[len(RELATION) :]: (step, v) for step, name, v in rows if name.startswith(RELATION)
    }
    if not all(pair in logged for pair in term.pair_names):
        return {**term.record(), "source": "initial"}
    values = [logged[pair][1] for pair in term.pair_names]
    step = max(logged[pair][0] for pair in term.pair_names)
    return {**term.record(values), "source": "log", "step": step}


def _series(curves: Mapping[str, list[tuple[int, float]]], prefix: str) -> dict[str, Any]:
    return {n[len(prefix) :]: sorted(p) for n, p in curves.items() if n.startswith(prefix) and p}


def _figure(record: Mapping[str, Any], over_training: dict[str, Any]) -> bytes:
    """Left: ``c`` per pair over the student's training, with the floor and the uniform
    weight; right: the final relation as a task × task matrix."""
    fig = Figure(figsize=(11.0, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.6, 1.0])
    for k, (pair, points) in enumerate(over_training.items()):
        steps, values = zip(*points, strict=True)
        marker = "o" if len(points) <= 30 else None
        left.plot(steps, values, label=pair, color=f"C{k % 10}", marker=marker, ms=3)
    pairs = max(1, len(record["relation"]))
    left.axhline(1.0 / pairs, color="grey", linestyle=":", linewidth=1, label="uniform")
    left.axhline(record["floor"], color="black", linestyle="--", linewidth=1, label="floor")
    left.set_title("student: task relation c over training", fontsize=10)
    left.set_xlabel("step")
    left.set_ylabel("c (pairs sum to 1)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="pair")
    tasks, matrix = record["tasks"], record["matrix"]
    shown = [[float("nan") if i == j else v for j, v in enumerate(r)] for i, r in enumerate(matrix)]
    image = right.imshow(shown, vmin=0.0, cmap="viridis")  # the diagonal blank
    top = max(map(max, matrix))
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            if i != j:
                shade = "white" if matrix[i][j] < 0.5 * top else "black"
                right.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=8,
                           color=shade)  # fmt: skip
    right.set_xticks(range(len(tasks)), tasks, fontsize=8, rotation=30, ha="right")
    right.set_yticks(range(len(tasks)), tasks, fontsize=8)
    right.set_title("final relation c", fontsize=10)
    fig.colorbar(image, ax=right, fraction=0.05)
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def saliency_section(
    run_dir: Path, metrics: Mapping[str, Any], curves: Mapping[str, Mapping[str, Any]]
) -> str:
    """Markdown: how the student's tasks relate by saliency (SRDML), with
    :data:`~unirep.layout.SALIENCY_FIGURE` drawn from ``curves`` (:func:`read_curves`' raw
    ``{phase: {series: points}}``); empty without ``summary.saliency``."""
    record = metrics.get("summary", {}).get("saliency")
    if not record:
        return ""
    student = curves.get("student", {})
    over_training = _series(student, RELATION)
    distances = _series(student, DISTANCE)
    atomic_write_bytes(Path(run_dir) / layout.SALIENCY_FIGURE, _figure(record, over_training))
    rows = ["| task pair | relation c | saliency distance D (last logged) |", "|:---|---:|---:|"]
    for pair, value in sorted(record["relation"].items(), key=lambda kv: -kv[1]):
        d = distances.get(pair)
        rows.append(f"| {pair} | {value:.3f} | {f'{d[-1][1]:.4g}' if d else '–'} |")
    pairs = len(record["relation"])
    bound = 1 - (pairs - 1) * record["floor"]
    return (
        "## How the tasks relate (SRDML)\n\n"
        f"The student's objective adds μ·Σ (c_uv/Σc)·‖α_u − α_v‖₁ (μ = {record['weight']:g}), "
        "α_t being the gradient of task t's mean output score w.r.t. the shared encoder stages, "
        "summed over space (Bai & Zhao, KDD 2022). The relation c is learned: a pair whose "
        "saliencies are closer than the weighted mean gains weight. Each pair keeps at least "
        f"the floor {record['floor']:g} and at most {bound:g}; uniform is {1 / pairs:.3g}. "
        f"Closest pair: **{record['closest']}**.\n\n" + "\n".join(rows) + "\n\n"
        f"![Task relation over training]({layout.SALIENCY_FIGURE})"
    )
