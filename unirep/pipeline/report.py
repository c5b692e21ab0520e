"""Markdown run report: metric tables plus training-curve and per-task figures.

:func:`write_report` turns the ``metrics.json`` dict of a run (schema in the architecture notes)
and its logged curves into ``report.md`` with its PNG figures beside it (training curves, the main
metric per task and, when the task-balancing method logs them, task weights and gradient
cosines). Nothing here knows a task by name: per-task colouring of prediction maps comes from the
caller (``Task.render``). Figures are drawn on
matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), so no display is needed and
the process-wide pyplot backend is left untouched.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unirep.io import atomic_write_bytes
from unirep.layout import (
    BRANCHING_FIGURE,
    CURVES_FIGURE,
    PER_TASK_FIGURE,
    PRUNING_FIGURE,
    REPORT,
    WEIGHTING_FIGURE,
)
from unirep.metrics.classification import METRIC_HIGHER_IS_BETTER

__all__ = [
    "CURVES_FIGURE",
    "PER_TASK_FIGURE",
    "REPORT_FILE",
    "WEIGHTING_FIGURE",
    "aggregate_runs",
    "comparison_sentence",
    "format_metric",
    "labels_section",
    "prediction_grid_figure",
    "uncertainty_section",
    "write_figure",
    "write_report",
]

REPORT_FILE = REPORT

ROLES: tuple[str, ...] = ("teacher", "baseline", "student")
"""Columns of the per-task table, in order."""

# Metrics stored as fractions in [0, 1] and shown as percentages.
PERCENT_METRICS = frozenset(
    {"accuracy", "miou", "pixel_acc", "within_11.25", "within_22.5", "within_30"}
)

# The metric drawn in the per-task bar chart: the first one a task has, in this order.
MAIN_METRIC_ORDER: tuple[str, ...] = ("accuracy", "miou", "abs_err", "angle_mean")

_MISSING = "–"


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def format_metric(name: str, value: float | None) -> str:
    """A metric value as printed in the report.

    Accuracy-like metrics (fractions) become percentages with 2 decimals; every other metric
    (errors, angles) keeps its unit with 4 decimals. ``None`` prints as a dash.
    """
    if value is None:
        return _MISSING
    if not math.isfinite(value):
        return str(value)
    if name in PERCENT_METRICS:
        return f"{100.0 * value:.2f}"
    return f"{value:.4f}"


def _metric_label(name: str) -> str:
    unit = " (%)" if name in PERCENT_METRICS else ""
    direction = METRIC_HIGHER_IS_BETTER.get(name)
    arrow = "" if direction is None else (" ↑" if direction else " ↓")
    return f"{name}{unit}{arrow}"


def _format_count(n: int | float) -> str:
    if n >= 1e6:
        return f"{int(n):,} ({n / 1e6:.2f} M)"
    return f"{int(n):,}"


def _format_seconds(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds:.1f} s ({seconds / 3600:.2f} h)"
    if seconds >= 60:
        return f"{seconds:.1f} s ({seconds / 60:.1f} min)"
    return f"{seconds:.1f} s"


def _table(header: list[str], rows: list[list[str]], align: list[str]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _task_metric_names(task_entry: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Metric names of one task, in first-seen order over student, teacher, baseline."""
    names: list[str] = []
    for role in ("student", "teacher", "baseline"):
        for name in task_entry.get(role, {}):
            if name not in names:
                names.append(name)
    return names


def _per_task_table(tasks: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    rows = []
    for task, entry in tasks.items():
        for name in _task_metric_names(entry):
            cells = [format_metric(name, entry.get(role, {}).get(name)) for role in ROLES]
            rows.append([task, _metric_label(name), *cells])
    return _table(["task", "metric", *ROLES], rows, ["l", "l", "r", "r", "r"])


RUN_RELATIVE_SCORE = "Decathlon score, run-relative (each domain's teacher as the reference)"
OFFICIAL_SCORE = "Decathlon score, official (published ResNet-26 Finetune errors as the reference)"

# Summary rows, in order: (key, label, kind); kind "%" is a fraction shown ×100, "Δ" a Δm in %,
# "score" a Decathlon score.
_SUMMARY_ROWS: tuple[tuple[str, str, str], ...] = (
    ("mean_accuracy", "student mean accuracy (%)", "%"),
    ("baseline_mean_accuracy", "baseline mean accuracy (%)", "%"),
    ("teacher_mean_accuracy", "teachers' mean accuracy (%)", "%"),
    ("delta_m_vs_teachers", "student Δm vs teachers (%)", "Δ"),
    ("baseline_delta_m_vs_teachers", "baseline Δm vs teachers (%)", "Δ"),
    ("delta_m_all_metrics_vs_teachers", "student Δm vs teachers, all metrics (%)", "Δ"),
    ("baseline_delta_m_all_metrics_vs_teachers", "baseline Δm vs teachers, all metrics (%)", "Δ"),
    ("delta_m_vs_baseline", "student Δm vs baseline (%)", "Δ"),
    ("delta_m_vs_full_label_teachers", "student Δm vs full-label teachers (%)", "Δ"),
    ("baseline_delta_m_vs_full_label_teachers", "baseline Δm vs full-label teachers (%)", "Δ"),
    ("decathlon_score", f"student {RUN_RELATIVE_SCORE}", "score"),
    ("baseline_decathlon_score", f"baseline {RUN_RELATIVE_SCORE}", "score"),
)

_ROLE_NAMES = {"teacher": "teachers", "full_label_teacher": "full-label teachers"}

_PARAMETER_NAMES = {"adapters": "alignment adapters", "teachers_total": "all teachers"}

# Scalar settings, by label (their values are names or counts, not measurements).
_SETTING_NAMES = {"weighting": "task weighting", "cross_task": "cross-task module"}

_SUMMARY_OWN_SECTIONS = {"uncertainty", "partial"}


def _label(key: str) -> str:
    """A summary key as words (``phase_seconds`` → ``phase seconds``)."""
    return key.replace("_", " ")


def _summary_table(summary: Mapping[str, Any]) -> str:
    """Every scalar of the summary with its name in words and its unit: fractions as %, Δm in %,
    Decathlon scores named by their reference, counts, times."""
    rows: list[list[str]] = []
    for key, label, kind in _SUMMARY_ROWS:
        value = summary.get(key)
        if value is None:
            continue
        if kind == "%":
            rows.append([label, f"{100.0 * value:.2f}"])
        elif kind == "Δ":
            rows.append([label, f"{value:+.2f}"])
        else:
            rows.append([label, f"{value:.1f}"])
    for role, score in (summary.get("official_decathlon_score") or {}).items():
        if score is not None:
            rows.append([f"{_ROLE_NAMES.get(role, role)} {OFFICIAL_SCORE}", f"{score:.1f}"])
    for who, n in (summary.get("params") or {}).items():
        name = _PARAMETER_NAMES.get(who, _label(who))
        rows.append([f"parameters ({name})", _MISSING if n is None else _format_count(n)])
    if summary.get("backbone_multiplier") is not None:
        rows.append(["student backbone size (teacher backbones)",
                     f"{summary['backbone_multiplier']:.2f} ×"])  # fmt: skip
    if summary.get("train_seconds") is not None:
        rows.append(["training time", _format_seconds(float(summary["train_seconds"]))])
    if summary.get("num_processes") is not None:
        rows.append(["processes", str(summary["num_processes"])])
    known = {k for k, _, _ in _SUMMARY_ROWS} | {
        "official_decathlon_score", "params", "backbone_multiplier", "train_seconds",
        "num_processes",
    }  # fmt: skip
    for key, value in summary.items():
        if key in known or value is None or isinstance(value, Mapping | list):
            continue
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        rows.append([_SETTING_NAMES.get(key, _label(key)), text])
    return _table(["quantity", "value"], rows, ["l", "r"])


def _comparison_names(name: str) -> tuple[str, str]:
    """``student_vs_teachers`` → (``student``, ``teachers``)."""
    model, _, reference = name.partition("_vs_")
    return _label(model), _label(reference)


def _interval_text(ci: Sequence[float], digits: int = 2) -> str:
    return f"95 % CI {ci[0]:+.{digits}f} … {ci[1]:+.{digits}f}"


def comparison_sentence(name: str, record: Mapping[str, Any]) -> str:
    """One comparison of ``summary.uncertainty`` as a sentence: ``student − baseline: +0.07
    percentage points of mean accuracy (95 % CI -0.90 … +1.00): no clear difference``."""
    model, reference = _comparison_names(name)
    diff, ci, verdict = record["difference"], record["ci95"], record["verdict"]
    if record.get("unit") == "%":  # Δm of the model with the reference as its reference
        return (
            f"{model} vs {reference}: {record.get('quantity', 'Δm')} {diff:+.2f} % "
            f"({_interval_text(ci)}): {verdict}"
        )
    return (
        f"{model} − {reference}: {diff:+.2f} {record.get('unit', '')} of "
        f"{record.get('quantity', 'the headline')} ({_interval_text(ci)}): {verdict}"
    )


def _per_task_uncertainty(uncertainty: Mapping[str, Any]) -> str:
    """Table: each task's difference per comparison, its interval, McNemar's p (accuracy)."""
    rows = []
    mcnemar = False
    for name, record in uncertainty.items():
        model, reference = _comparison_names(name)
        for task, entry in (record.get("per_task") or {}).items():
            if entry.get("difference") is None or entry.get("ci95") is None:
                continue
            digits = 2 if entry.get("unit") in ("percentage points", "degrees") else 4
            unit = "points" if entry.get("unit") == "percentage points" else entry.get("unit")
            p = entry.get("mcnemar_p")
            mcnemar = mcnemar or p is not None
            rows.append([
                task, f"{model} − {reference}", f"{entry['metric']} ({unit})",
                f"{entry['difference']:+.{digits}f}",
                f"{entry['ci95'][0]:+.{digits}f} … {entry['ci95'][1]:+.{digits}f}",
                _MISSING if p is None else f"{p:.3g}", entry.get("verdict") or _MISSING,
            ])  # fmt: skip
    if not rows:
        return ""
    header = ["task", "comparison", "metric", "difference", "95 % CI", "McNemar p", "verdict"]
    if not mcnemar:
        header.pop(5)
        rows = [row[:5] + row[6:] for row in rows]
    return _table(header, rows, ["l", "l", "l"] + ["r"] * (len(header) - 3))


def uncertainty_section(summary: Mapping[str, Any], split: str) -> str:
    """Markdown: how clear the student's differences are (``summary.uncertainty``), or a line
    saying it was not measured where the run compares models without per-image scores."""
    uncertainty = summary.get("uncertainty") or {}
    if not uncertainty:
        compared = any(
            summary.get(k) is not None
            for k in ("delta_m_vs_teachers", "delta_m_vs_baseline", "baseline_mean_accuracy")
        )
        if not compared:
            return ""
        return (
            "How clear these differences are was not measured: the evaluations of this run "
            "kept no per-image scores."
        )
    lines = ["## How clear the differences are", ""]
    lines += [f"- {comparison_sentence(n, r)}." for n, r in uncertainty.items()]
    first = next(iter(uncertainty.values()))
    resamples, seed = first.get("resamples", "?"), first.get("seed", "?")
    images = first.get("images")
    counted = f"the {images:,} {split} images" if isinstance(images, int) else f"the {split} images"
    per_stream = " (each input stream on its own)" if "stream" in first.get("method", "") else ""
    note = (
        f"Each interval is a paired bootstrap over {counted} ({resamples} resamples, seed "
        f"{seed}): the images are drawn again with replacement{per_stream}, both models are "
        "scored on the same draw exactly as on the whole split, and the 2.5 and 97.5 "
        "percentiles of the difference bound the interval. An interval that holds 0 is "
        '"no clear difference": this test set cannot tell the two apart.'
    )
    table = _per_task_uncertainty(uncertainty)
    if table:
        lines += ["", table]
        if "McNemar p" in table:
            note += (
                " McNemar p: the exact test on the images only one of the two models gets "
                "right, per task and not corrected for testing several tasks."
            )
    return "\n".join([*lines, "", note])


def labels_section(summary: Mapping[str, Any]) -> str:
    """Markdown: which training labels a partially labelled run had (``summary.partial``)."""
    part = summary.get("partial")
    if not part:
        return ""
    distill = part.get("distillation")
    text = (
        f"Protocol `{part.get('protocol')}`, method `{part.get('method')}`"
        + ("" if distill is None else f", distillation {'on' if distill else 'off'}")
        + "."
    )
    labels = part.get("labels") or {}
    n = labels.get("num_images")
    if not labels or not n:
        return "## Training labels\n\n" + text + " Every training image is labelled for every task."
    rows = [
        [task, f"{count:,}", f"{100.0 * count / n:.1f}"]
        for task, count in (labels.get("labels_per_task") or {}).items()
    ]
    unlabelled = labels.get("unlabelled_images")
    text += (
        f" Of the {n:,} training images, each task was labelled on those below"
        + ("" if unlabelled is None else f" ({unlabelled:,} images have no label at all)")
        + "; the split is saved in `label_split.json`. Validation and test keep every label."
    )
    return (
        "## Training labels\n\n"
        + text
        + "\n\n"
        + _table(["task", "labelled images", "labelled (%)"], rows, ["l", "r", "r"])
    )


_CHOICE_CODES = {"shared": 0, "specific": 1, "skip": 2}


def _branching_section(sharing: Mapping[str, Any]) -> str:
    """Markdown: the branching an AutoMTL search chose (how many convolutions each task shares,
    owns and skips) and :data:`BRANCHING_FIGURE`."""
    choices = sharing.get("choices") or {}
    tasks = list(next(iter(choices.values()), {}))
    rows = [
        [t] + [str(sum(c[t] == k for c in choices.values())) for k in _CHOICE_CODES] for t in tasks
    ]
    shared_by_all = sum(all(v == "shared" for v in c.values()) for c in choices.values())
    return (
        "## What the tasks share\n\n"
        "AutoMTL-style search: at each of the encoder's "
        f"{len(choices)} convolutions every task chose the shared operator, its own copy or a "
        f"skip (per-task batch norms everywhere); {shared_by_all} convolutions are shared by "
        "every task. The student is that fixed architecture, retrained from the start "
        "(`branching/student.json` holds the choices and the search's probabilities).\n\n"
        + _table(["task", "shared", "own copy", "skipped"], rows, ["l", "r", "r", "r"])
        + f"\n\n![Which task shares which convolution]({BRANCHING_FIGURE})"
    )


def _branching_figure(sharing: Mapping[str, Any]) -> bytes | None:
    """Tasks × the encoder's convolutions, each cell coloured by the task's choice there; the
    search's probability of that choice written in it when recorded."""
    choices = sharing.get("choices") or {}
    if not choices:
        return None
    layers = list(choices)
    tasks = list(choices[layers[0]])
    grid = [[_CHOICE_CODES[choices[layer][t]] for layer in layers] for t in tasks]
    stages = sharing.get("stages") or [{}]
    probs = stages[0].get("probabilities") if stages else None
    from matplotlib.colors import ListedColormap

    fig = Figure(figsize=(max(4.0, 0.45 * len(layers) + 1.5), 0.5 * len(tasks) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    colours = ListedColormap(["#4c72b0", "#dd8452", "#cccccc"])
    ax.imshow(grid, cmap=colours, vmin=0, vmax=2, aspect="auto")
    for i, task in enumerate(tasks):
        for j, layer in enumerate(layers):
            if probs is not None:
                p = probs[j][i][_CHOICE_CODES[choices[layer][task]]]
                ax.text(j, i, f"{p:.2f}", ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=6)
    ax.set_title("blue: shared · orange: own copy · grey: skipped", fontsize=8)
    fig.tight_layout()
    return _figure_png(fig)


def _fusion_section(sharing: Mapping[str, Any]) -> str:
    """Markdown: progressive decoder fusion's decision at each stage (the CKA of every pair of
    tasks after the block, the groups chosen) and the decoder the student ended with."""
    lines = [
        "## What the tasks share",
        "",
        "Progressive decoder fusion (PDF): the decoder's blocks (one per encoder stage, then the "
        f"closing conv; {sharing.get('blocks')} in all) start separate per task; after each "
        "stage, the tasks are compared by debiased linear CKA of their maps after the next "
        "block (validation images, mean-pooled over space) and the groups chosen share that "
        "block in the next stage.",
    ]
    for k, stage in enumerate(sharing.get("stages") or []):
        sim = stage.get("similarity") or {}
        names = list(sim)
        pairs = [f"{a}–{b} {sim[a][b]:.3f}" for i, a in enumerate(names) for b in names[i + 1 :]]
        groups = " · ".join("+".join(g) for g in stage.get("groups", []))
        how = (
            "reaches the threshold"
            if stage.get("cleared")
            else "no grouping reaches the threshold: "
            + ("the reference's fallback fuses the closest tasks" if stage.get("fallback") ==
               "reference" else "every task keeps its own block")
        )  # fmt: skip
        lines += [
            "",
            f"- stage {k}, block {stage.get('block')} ({stage.get('images')} images, threshold "
            f"{stage.get('min_similarity')}): CKA {', '.join(pairs)}; groups {groups} ({how}).",
        ]
    fused = sharing.get("fusion") or []
    final = (
        "; ".join(
            f"block {j}: " + " · ".join("+".join(g) for g in part) for j, part in enumerate(fused)
        )
        if fused
        else "no block is fused (every task has its own decoder)"
    )
    lines += ["", f"The student's decoder: {final}; later blocks per task."]
    return "\n".join(lines)


def watershed(iou: Mapping[str, Any]) -> int | None:
    """Index of DiSparse's "watershed" layer: the shared layer after which the tasks' keep
    masks agree least, i.e. with the largest drop of the pairwise IoU from the layer before
    (None with fewer than two layers)."""
    values = list(iou.get("pairwise") or [])
    if len(values) < 2:
        return None
    drops = [values[i - 1] - values[i] for i in range(1, len(values))]
    return 1 + max(range(len(drops)), key=drops.__getitem__)


def _pruning_section(sharing: Mapping[str, Any]) -> str:
    """Markdown: what DiSparse kept (target and real densities, per task's own weights) and the
    per-layer IoU of the tasks' keep masks over the shared encoder, with :data:`PRUNING_FIGURE`."""
    tasks = sharing.get("task_density") or {}
    text = (
        f"DiSparse ({sharing.get('mode')} masks): each task kept its top "
        f"{100 * float(sharing.get('target_density', 0)):.1f} % of the weights it reaches, and a "
        "shared weight is pruned only when every task prunes it. Real density: "
        f"{100 * float(sharing.get('density', 0)):.1f} % of the "
        f"{sharing.get('prunable_weights')} prunable weights (shared encoder "
        f"{100 * float(sharing.get('shared_density', 0)):.1f} %; own decoder and head: "
        + ", ".join(f"{t} {100 * d:.1f} %" for t, d in tasks.items())
        + "). The union over tasks is why the real density is above the target."
    )
    iou = sharing.get("iou") or {}
    layers = iou.get("layers") or []
    if not layers:
        return "## What the tasks share\n\n" + text
    density = sharing.get("layers") or {}
    rows = [
        [name, f"{100 * float(density.get(name, 1.0)):.1f}", f"{a:.3f}", f"{p:.3f}"]
        for name, a, p in zip(layers, iou["iou"], iou["pairwise"], strict=True)
    ]
    shed = watershed(iou)
    text += (
        " The IoU of the tasks' keep masks (|kept by all| / |kept by any|, and its mean over "
        "task pairs) says how alike the sub-networks the tasks chose are, layer by layer"
        + (
            f"; it drops most at `{layers[shed]}` (the watershed layer: past it, the tasks "
            "want different weights and sharing buys little)."
            if shed is not None
            else "."
        )
    )
    return (
        "## What the tasks share\n\n"
        + text
        + "\n\n"
        + _table(
            ["shared layer", "density (%)", "IoU (all)", "IoU (pairs)"], rows, ["l", "r", "r", "r"]
        )
        + f"\n\n![Density and keep-mask IoU per shared layer]({PRUNING_FIGURE})"
    )


def _pruning_figure(sharing: Mapping[str, Any]) -> bytes | None:
    """The shared layers' density and the IoU of the tasks' keep masks, layer by layer."""
    iou = sharing.get("iou") or {}
    layers = iou.get("layers") or []
    if not layers:
        return None
    density = sharing.get("layers") or {}
    fig = Figure(figsize=(max(4.5, 0.45 * len(layers) + 1.5), 3.2))
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(layers)))
    ax.plot(x, [density.get(n, 1.0) for n in layers], "o-", label="density kept")
    ax.plot(x, iou["iou"], "s-", label="IoU, all tasks")
    ax.plot(x, iou["pairwise"], "^-", label="IoU, mean over pairs")
    shed = watershed(iou)
    if shed is not None:
        ax.axvline(shed, color="grey", linestyle=":", label="watershed")
    ax.set_xticks(x, [n.replace("encoder.", "") for n in layers], rotation=60, ha="right",
                  fontsize=6)  # fmt: skip
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _figure_png(fig)


def _auxiliary_section(sharing: Mapping[str, Any]) -> str:
    """Markdown: what each task kept of the pruned auxiliary network (units per layer) and how
    much the tasks' masks overlap (IoU over every unit)."""
    layers = list(sharing.get("layers") or {})
    kept = sharing.get("kept") or {}
    overlap = sharing.get("overlap") or {}
    tasks = list(kept)
    widths = sharing.get("layers") or {}
    rows = [[t] + [f"{kept[t][n]}/{widths[n]}" for n in layers] for t in tasks]
    pairs = [f"{a}–{b} {overlap[a][b]:.2f}" for i, a in enumerate(tasks) for b in tasks[i + 1 :]]
    stage = (sharing.get("stages") or [{}])[0]
    aux = (
        f" The auxiliary network ({stage.get('union_classes')} union classes) reached "
        f"{100 * stage['val_accuracy']:.1f} % validation accuracy at step {stage.get('best_step')}."
        if stage.get("val_accuracy") is not None
        else ""
    )
    return (
        "## What each task kept\n\n"
        "Pruned auxiliary network: each task reads the auxiliary network (learnt on the union "
        f"of the tasks' classes) through its own mask, the {sharing.get('keep')} share of each "
        "layer's units most important to its classes (first-order Taylor importance on its "
        f"labelled images); auxiliary loss weight {sharing.get('auxiliary_weight')}.{aux} "
        "Pairwise IoU of the masks: " + (", ".join(pairs) or "one task") + " "
        "(`unit_masks/student.json` holds the masks and the importances).\n\n"
        + _table(["task", *layers], rows, ["l"] + ["r"] * len(layers))
    )


def sharing_section(summary: Mapping[str, Any]) -> str:
    """Markdown: what the student's tasks share (``summary.sharing``: SMTL's gate per task and,
    for the Lite gate, the encoder each task picked) and what the exported student costs to run
    (``summary.inference``)."""
    blocks = []
    sharing = summary.get("sharing")
    if sharing and sharing.get("name") == "pdf":
        blocks.append(_fusion_section(sharing))
    elif sharing and sharing.get("name") == "automtl":
        blocks.append(_branching_section(sharing))
    elif sharing and sharing.get("name") == "disparse":
        blocks.append(_pruning_section(sharing))
    elif sharing and sharing.get("name") == "pruned_auxiliary":
        blocks.append(_auxiliary_section(sharing))
    elif sharing:
        chosen = sharing.get("chosen") or {}
        rows = [
            [task, f"{w[0]:.3f}", f"{w[1]:.3f}", chosen.get(task, "both")]
            for task, w in (sharing.get("weights") or {}).items()
        ]
        variant = "gates after the decoders" if sharing.get("after_decoders") else "gated encoders"
        text = (
            f"`{sharing.get('name')}`, {sharing.get('gate')} gate, {variant}; distillation aligns "
            f"the teachers with the {sharing.get('distill_from')} feature. α is each task's weight "
            "on the public (shared) encoder and on its private one, as evaluation uses them."
        )
        if chosen:
            dropped = [t for t, c in chosen.items() if c == "public"]
            text += (
                " The export keeps only the encoders some task picked: "
                + (f"the private encoders of {', '.join(dropped)} are dropped" if dropped
                   else "every private encoder")
                + ("" if any(c == "public" for c in chosen.values())
                   else " and the public encoder is dropped")
                + "."
            )  # fmt: skip
        blocks.append(
            "## What the tasks share\n\n"
            + text
            + "\n\n"
            + _table(["task", "α public", "α private", "encoder"], rows, ["l", "r", "r", "l"])
        )
    cost = (summary.get("inference") or {}).get("student")
    if cost:
        rows = [
            ["parameters", _format_count(cost["params"])],
            ["weights (MiB)", f"{cost['weight_bytes'] / 2**20:.2f}"],
            ["MACs per image", _format_count(cost["macs_per_image"])],
            [f"ms per image ({cost.get('device')}, {cost.get('threads')} thread(s))",
             f"{cost['milliseconds_per_image']:.3f}"],
        ]  # fmt: skip
        shape = "×".join(str(d) for d in cost.get("input", []))
        blocks.append(
            f"## Inference cost\n\nThe exported student on one {shape} image (MACs counted by "
            "torch's FlopCounterMode; time: the median of 5 batches of 8 on this machine).\n\n"
            + _table(["quantity", "value"], rows, ["l", "r"])
        )
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _figure_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _curves_figure(curves: Mapping[str, Mapping[str, list[tuple[int, float]]]]) -> bytes:
    """One subplot per series name, one line per phase."""
    series_names = sorted({name for series in curves.values() for name in series})
    ncols = min(3, len(series_names))
    nrows = math.ceil(len(series_names) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, name in zip(axes[: len(series_names)], series_names, strict=True):
        values_seen: list[float] = []
        for k, (phase, series) in enumerate(curves.items()):
            points = series.get(name)
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            # Same colour for a phase in every subplot; markers keep short series visible.
            marker = "o" if len(points) <= 30 else None
            ax.plot(steps, values, label=phase, color=f"C{k}", linewidth=1.2, marker=marker, ms=3)
            values_seen.extend(values)
        # Losses span orders of magnitude; a log axis shows late progress (only if all > 0).
        if "loss" in name and values_seen and all(v > 0 for v in values_seen):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(series_names) :]:
        ax.set_visible(False)
    return _figure_png(fig)


def _main_metric(entry: Mapping[str, Mapping[str, float]]) -> str | None:
    names = _task_metric_names(entry)
    for name in MAIN_METRIC_ORDER:
        if name in names:
            return name
    return names[0] if names else None


def _per_task_figure(tasks: Mapping[str, Mapping[str, Mapping[str, float]]]) -> bytes | None:
    """Grouped bars (teacher / baseline / student) of each task's main metric.

    Tasks are grouped by main metric, one subplot per metric, so that unlike scales (accuracy
    vs an error vs an angle) never share an axis. ``None`` when no task has a metric.
    """
    by_metric: dict[str, list[str]] = {}
    for task, entry in tasks.items():
        metric = _main_metric(entry)
        if metric is not None:
            by_metric.setdefault(metric, []).append(task)
    if not by_metric:
        return None
    fig = Figure(
        figsize=(
            max(4.0, 1.0 + 0.9 * max(len(t) for t in by_metric.values())),
            3.4 * len(by_metric),
        ),
        layout="constrained",
    )
    axes = fig.subplots(len(by_metric), 1, squeeze=False).ravel()
    width = 0.8 / len(ROLES)
    for ax, (metric, metric_tasks) in zip(axes, by_metric.items(), strict=True):
        scale = 100.0 if metric in PERCENT_METRICS else 1.0
        for i, role in enumerate(ROLES):
            xs, heights = [], []
            for j, task in enumerate(metric_tasks):
                value = tasks[task].get(role, {}).get(metric)
                if value is not None:
                    xs.append(j + (i - (len(ROLES) - 1) / 2) * width)
                    heights.append(scale * value)
            if xs:
                ax.bar(xs, heights, width=width, label=role, color=f"C{i}")
        ax.set_xticks(range(len(metric_tasks)), metric_tasks, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(_metric_label(metric))
        ax.grid(axis="y", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # nothing measured (an unlabelled split): no legend
            ax.legend(fontsize=7)
    return _figure_png(fig)


def _has_points(by_name: Mapping[str, list[tuple[int, float]]]) -> bool:
    return any(points for points in by_name.values())


def _weighting_figure(
    weighting: Mapping[str, Mapping[str, Mapping[str, list[tuple[int, float]]]]],
) -> bytes | None:
    """One row per phase: effective task weights (one line per task) and gradient cosines (one
    line per task pair, with the zero line). ``None`` when no phase logged any point."""
    phases = [
        phase
        for phase, terms in weighting.items()
        if _has_points(terms.get("weight", {})) or _has_points(terms.get("gradcos", {}))
    ]
    if not phases:
        return None
    dominance = any(_has_points(weighting[p].get("dominance", {})) for p in phases)
    columns = 3 if dominance else 2
    fig = Figure(figsize=(5.5 * columns, 3.4 * len(phases)), layout="constrained")
    axes = fig.subplots(len(phases), columns, squeeze=False)
    panels = (
        ("weight", "effective task weight", "task"),
        ("gradcos", "gradient cosine", "task pair"),
    )
    for row, phase in enumerate(phases):
        if dominance:
            _dominance_panel(axes[row, 2], phase, weighting[phase].get("dominance", {}))
        for col, (term, ylabel, what) in enumerate(panels):
            ax = axes[row, col]
            lines = {name: pts for name, pts in weighting[phase].get(term, {}).items() if pts}
            ax.set_title(f"{phase}: {ylabel}s", fontsize=10)
            if not lines:
                ax.text(0.5, 0.5, f"no {ylabel}s logged", ha="center", va="center", fontsize=9)
                ax.set_axis_off()
                continue
            for k, (name, points) in enumerate(lines.items()):
                steps, values = zip(*points, strict=True)
                marker = "o" if len(points) <= 30 else None
                style = ("-", "--", ":", "-.")[k // 10 % 4]  # colours repeat after ten
                ax.plot(
                    steps,
                    values,
                    label=name,
                    color=f"C{k % 10}",
                    linestyle=style,
                    linewidth=1.1,
                    marker=marker,
                    ms=3,
                )
            if term == "gradcos":
                ax.axhline(0.0, color="black", linewidth=0.9)
                ax.set_ylim(-1.05, 1.05)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(
                fontsize=6,
                ncols=1 + len(lines) // 16,
                title=what,
                title_fontsize=7,
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),  # outside: pairs grow quadratically with tasks
            )
    return _figure_png(fig)


def _dominance_panel(ax: Any, phase: str, series: Mapping[str, list[tuple[int, float]]]) -> None:
    """Heat map of the last measured task dominance (rAU): shared layers (rows, input side at the
    top) × tasks (columns); a row near 1 in one column is a layer that task dominates."""
    last = {name: pts[-1] for name, pts in series.items() if pts}
    ax.set_title(f"{phase}: task dominance of shared layers", fontsize=10)
    if not last:
        ax.text(0.5, 0.5, "no task dominance measured", ha="center", va="center", fontsize=9)
        ax.set_axis_off()
        return
    layers = list(dict.fromkeys(name.rsplit("/", 1)[0] for name in last))
    tasks = list(dict.fromkeys(name.rsplit("/", 1)[1] for name in last))
    grid = [
        [last.get(f"{layer}/{task}", (0, float("nan")))[1] for task in tasks] for layer in layers
    ]
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=max(4, 8 - len(layers) // 12))
    step = max(pts[-1][0] for pts in series.values() if pts)
    ax.set_xlabel(f"task (rAU at step {step})")
    ax.figure.colorbar(image, ax=ax, fraction=0.05)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def write_figure(path: Path, png: bytes) -> None:
    """Write a PNG produced by this module atomically (readers see the old or the new file)."""
    atomic_write_bytes(Path(path), png)


def _array(x: Any) -> Any:
    """A numpy view of an array-like (a torch tensor on any device included)."""
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x)


RenderFn = Callable[[Any, Any], Any]
"""One sample's prediction map and its ground truth (or None) -> ``[H, W, 3]`` RGB in [0, 1]."""


def prediction_grid_figure(
    images: Any,
    columns: Mapping[str, Mapping[str, Any]],
    tasks: Sequence[str],
    render: Mapping[str, RenderFn],
) -> bytes:
    """PNG grid of per-pixel predictions: one row per (image, task), one column per source.

    Args:
        images: ``[N, 3, H, W]`` input images (min-max scaled per image for display).
        columns: ``{source: {task: maps}}``, e.g. ``"ground truth"``, ``"teacher"``,
            ``"baseline"``, ``"student"``; ``maps[i]`` is sample ``i``'s map in whatever layout
            the task's ``render`` takes. A source without a task leaves a blank cell. The
            ``"ground truth"`` column, when present, is also handed to ``render`` as the target
            of every source's map (e.g. to share a colour scale).
        tasks: the tasks, in row order within each image.
        render: ``{task: fn(pred, target | None) -> [H, W, 3] RGB in [0, 1]}`` for every task
            in ``tasks``, e.g. ``{name: task.render for name, task in run_tasks.items()}``.
    """
    import numpy as np

    missing = [task for task in tasks if task not in render]
    if missing:
        raise ValueError(f"no render function for task(s) {missing}")
    images = _array(images)
    n = images.shape[0]
    sources = list(columns)
    ncols = 1 + len(sources)
    nrows = n * len(tasks)
    h, w = images.shape[-2:]
    cell = 1.6
    fig = Figure(figsize=(ncols * cell * w / h, nrows * cell + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    ground_truth = columns.get("ground truth", {})
    for i in range(n):
        image = images[i].transpose(1, 2, 0)
        image = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
        for j, task in enumerate(tasks):
            row = i * len(tasks) + j
            if j == 0:
                axes[row, 0].imshow(image)
            else:
                axes[row, 0].axis("off")
            axes[row, 1].set_ylabel(task, fontsize=8)
            gt = ground_truth.get(task)
            target = None if gt is None else _array(gt[i])
            for k, source in enumerate(sources):
                ax = axes[row, k + 1]
                maps = columns[source].get(task)
                if maps is None:
                    ax.axis("off")
                    continue
                ax.imshow(np.clip(render[task](_array(maps[i]), target), 0.0, 1.0))
    axes[0, 0].set_title("image", fontsize=9)
    for k, source in enumerate(sources):
        axes[0, k + 1].set_title(source, fontsize=9)
    return _figure_png(fig)


_REFERENCE_WORDS = {
    "student_vs_baseline": "the baseline (the same network and budget without distillation)",
    "student_vs_teachers": "the teachers",
}


def _amount(difference: float, unit: str, spread: str = "") -> str:
    return f"{difference:+.2f}{spread} " + ("%" if unit == "%" else "points")


def verdict_sentence(summary: Mapping[str, Any]) -> str:
    """One plain sentence: did distillation help this run, and by how much against each
    reference (``summary.uncertainty``'s bootstrap verdicts, or the bare differences)."""
    parts, helped = [], []
    for name, words in _REFERENCE_WORDS.items():
        found = _run_difference(summary, name)
        if found is None:
            continue
        diff, unit, verdict = found
        quantity = "Δm" if unit == "%" else "mean accuracy"
        clear = "" if verdict is None else f" ({verdict} at 95 %)"
        parts.append(f"against {words}, {_amount(diff, unit)} of {quantity}{clear}")
        helped.append(verdict == "clearly better" if verdict else diff > 0)
    if not parts:
        return ""
    answer = "Yes" if helped and all(helped) else "Partly" if any(helped) else "No"
    return f"**Did distillation help?** {answer}. The student is, " + "; ".join(parts) + "."


def verdict_over_runs(metrics: Sequence[Mapping[str, Any]]) -> str:
    """The same sentence over several runs (seeds): each difference's mean ± std and the runs
    the student is ahead in."""
    import statistics

    parts, helped = [], []
    for name, words in _REFERENCE_WORDS.items():
        over = _differences_over_runs(metrics, name)
        if over is None:
            continue
        values, unit, _ = over
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        ahead = sum(v > 0 for v in values)
        quantity = "Δm" if unit == "%" else "mean accuracy"
        parts.append(
            f"against {words}, {_amount(statistics.fmean(values), unit, spread)} of {quantity} "
            f"(ahead in {ahead} of {len(values)} runs)"
        )
        helped.append(ahead == len(values))
    if not parts:
        return ""
    answer = "Yes" if all(helped) else "Partly" if any(helped) else "No"
    return (
        f"**Did distillation help?** {answer}. Over {len(metrics)} runs (mean ± std), the "
        "student is, " + "; ".join(parts) + "."
    )


def write_report(
    run_dir: Path,
    metrics: dict[str, Any],
    curves: dict[str, dict[str, list[tuple[int, float]]]],
    extra_sections: list[str] | None = None,
    weighting: Mapping[str, Mapping[str, Mapping[str, list[tuple[int, float]]]]] | None = None,
) -> Path:
    """Write ``run_dir/report.md`` and its figures; return the report's path.

    Args:
        run_dir: the run directory (created if missing).
        metrics: the ``metrics.json`` dict: ``preset``, ``split``,
            ``tasks: {task: {"student"|"teacher"|"baseline": {metric: value}}}`` (teacher and
            baseline optional) and ``summary``.
        curves: ``{phase: {series: [(step, value), ...]}}``, e.g.
            ``{"student": {"train/loss": [(0, 2.3), ...]}, "teacher-<task>": {...}}``.
        extra_sections: markdown blocks appended at the end, in order; empty ones are skipped.
        weighting: the task-balancing series, as :func:`unirep.training.tracking.weighting_curves`
            returns them from the raw (not :func:`~unirep.training.tracking.report_curves`) curves:
            ``{phase: {"weight": {task: points}, "gradcos": {"<a>~<b>": points}}}``. When any
            point is present, :data:`WEIGHTING_FIGURE` is drawn and a "Task weighting" section
            embeds it; otherwise (None, empty) there is no such section.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, dict[str, dict[str, float]]] = metrics.get("tasks", {})
    summary: dict[str, Any] = metrics.get("summary", {})
    preset = metrics.get("preset", "unknown preset")
    split = metrics.get("split", "unknown")

    sections = [
        f"# unirep report: {preset} ({split} split)",
        verdict_sentence(summary),
        "Accuracy-like metrics are percentages; errors and angles are in their own units "
        "(↑ higher is better, ↓ lower is better). "
        f"Missing entries ({_MISSING}) were not trained or not measured in this run.",
        "## Summary\n\n" + _summary_table(summary),
        uncertainty_section(summary, split),
        labels_section(summary),
        sharing_section(summary),
    ]
    sections = [section for section in sections if section]
    if tasks:
        sections.append("## Per-task metrics\n\n" + _per_task_table(tasks))
        figure = _per_task_figure(tasks)
        if figure is not None:
            atomic_write_bytes(run_dir / PER_TASK_FIGURE, figure)
            sections.append(f"![Main metric per task]({PER_TASK_FIGURE})")
    if any(points for series in curves.values() for points in series.values()):
        atomic_write_bytes(run_dir / CURVES_FIGURE, _curves_figure(curves))
        sections.append(f"## Training curves\n\n![Training curves]({CURVES_FIGURE})")
    else:
        sections.append("## Training curves\n\nNo training curves were recorded.")
    sharing = summary.get("sharing") or {}
    if sharing.get("name") == "automtl":
        figure = _branching_figure(sharing)
        if figure is not None:
            atomic_write_bytes(run_dir / BRANCHING_FIGURE, figure)
    if sharing.get("name") == "disparse":
        figure = _pruning_figure(sharing)
        if figure is not None:
            atomic_write_bytes(run_dir / PRUNING_FIGURE, figure)
    figure = _weighting_figure(weighting or {})
    if figure is not None:
        atomic_write_bytes(run_dir / WEIGHTING_FIGURE, figure)
        sections.append(
            "## Task weighting\n\n"
            "Left: the effective weight the task-balancing method gave each task's loss at each "
            "step; middle: the cosine between two tasks' gradients on the shared parameters "
            "(below the black zero line the tasks pull the shared parameters in conflicting "
            "directions); right, when measured (``train.diagnostics_every``): each task's share "
            "of each shared layer's accumulated update (AdaTask's rAU; near 1: the layer is "
            "dominated by that task).\n\n"
            f"![Task weighting]({WEIGHTING_FIGURE})"
        )
    sections.extend(block.strip() for block in extra_sections or [] if block.strip())

    report = run_dir / REPORT_FILE
    atomic_write_bytes(report, ("\n\n".join(sections) + "\n").encode("utf-8"))
    return report


def aggregate_runs(metrics: list[Mapping[str, Any]]) -> str:
    """A markdown table of mean ± std over runs (e.g. seeds) of the headline figures.

    Rows: each task's main metric per role (the first of :data:`MAIN_METRIC_ORDER` it has), then
    whichever of the summary's mean accuracy, Δm vs teachers (main and all metrics), Δm vs the
    baseline and the Decathlon scores (run-relative, official) the runs report, for student and
    baseline. Below the table, the student's differences from the baseline and the teachers over
    the runs: mean ± std, the t interval of the mean and a verdict (the spread over seeds).
    """
    import statistics

    def stat(values: list[float], digits: int = 2) -> str:
        if not values:
            return "–"
        mean = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:.{digits}f} ± {spread:.{digits}f}"

    roles = ("teacher", "baseline", "student")
    rows: list[list[str]] = []
    tasks = list(metrics[0]["tasks"])
    for task in tasks:
        metric = _main_metric(metrics[0]["tasks"][task]) or "accuracy"
        scale = 100.0 if metric in PERCENT_METRICS else 1.0
        digits = 4 if metric in ("abs_err", "rel_err") else 2  # small absolute errors
        cells = []
        for role in roles:
            values = [
                m["tasks"][task][role][metric] * scale
                for m in metrics
                if role in m["tasks"].get(task, {})
            ]
            cells.append(stat(values, digits))
        rows.append([task, _metric_label(metric), *cells])
    for label, key, scale in (
        ("mean accuracy (%)", "mean_accuracy", 100.0),
        ("Δm vs teachers (%)", "delta_m_vs_teachers", 1.0),
        ("Δm vs teachers, all metrics (%)", "delta_m_all_metrics_vs_teachers", 1.0),
        ("Δm vs baseline (%)", "delta_m_vs_baseline", 1.0),
        (RUN_RELATIVE_SCORE, "decathlon_score", 1.0),
    ):
        student = [m["summary"][key] * scale for m in metrics if m["summary"].get(key) is not None]
        baseline = [
            m["summary"][f"baseline_{key}"] * scale
            for m in metrics
            if m["summary"].get(f"baseline_{key}") is not None
        ]
        teacher = [
            m["summary"]["teacher_mean_accuracy"] * 100
            for m in metrics
            if key == "mean_accuracy" and m["summary"].get("teacher_mean_accuracy") is not None
        ]
        if student or baseline or teacher:  # not every run has accuracy or a decathlon score
            rows.append(["**summary**", label, stat(teacher), stat(baseline), stat(student)])
    official = [
        stat([m["summary"]["official_decathlon_score"][role] for m in metrics
              if (m["summary"].get("official_decathlon_score") or {}).get(role) is not None])
        for role in roles
    ]  # fmt: skip
    if any(cell != "–" for cell in official):
        rows.append(["**summary**", OFFICIAL_SCORE, *official])
    header = ["task", "metric", "teacher", "baseline", "student"]
    headline = verdict_over_runs(metrics)
    text = (
        (headline + "\n\n" if headline else "")
        + f"{len(metrics)} runs, mean ± std: each cell is the mean over the runs ± their sample "
        "standard deviation (the spread over seeds)\n\n"
        + _table(header, rows, ["l", "l", "r", "r", "r"])
    )
    spread = _spread_of_differences(metrics)
    return text + ("\n\n" + spread if spread else "")


def _run_difference(summary: Mapping[str, Any], name: str) -> tuple[float, str, str | None] | None:
    """One run's ``name`` comparison: (difference, unit, verdict of its own bootstrap or None),
    from ``summary.uncertainty`` or else from the summary's means (points) or Δm (%)."""
    record = (summary.get("uncertainty") or {}).get(name)
    if record is not None:
        return record["difference"], record["unit"], record.get("verdict")
    reference = {"student_vs_baseline": "baseline", "student_vs_teachers": "teacher"}[name]
    mine, theirs = summary.get("mean_accuracy"), summary.get(f"{reference}_mean_accuracy")
    if mine is not None and theirs is not None:
        return 100.0 * (mine - theirs), "percentage points", None
    key = "delta_m_vs_baseline" if reference == "baseline" else "delta_m_vs_teachers"
    if summary.get(key) is not None:
        return float(summary[key]), "%", None
    return None


def _differences_over_runs(
    metrics: Sequence[Mapping[str, Any]], name: str
) -> tuple[list[float], str, list[str]] | None:
    """The ``name`` comparison in every run that has it: (differences, their one unit, the runs'
    own bootstrap verdicts); None when no run has it or the units differ."""
    found = [d for m in metrics if (d := _run_difference(m.get("summary", {}), name))]
    if not found or len({unit for _, unit, _ in found}) != 1:
        return None
    return [d for d, _, _ in found], found[0][1], [v for _, _, v in found if v is not None]


def _spread_of_differences(metrics: Sequence[Mapping[str, Any]]) -> str:
    """Markdown lines: each comparison's difference over the runs (mean ± std, the t interval of
    the mean, the runs the student is ahead in, the runs whose own bootstrap was clear)."""
    from unirep.metrics.uncertainty import NO_CLEAR_DIFFERENCE, mean_interval, verdict

    lines = []
    for name in ("student_vs_baseline", "student_vs_teachers"):
        over = _differences_over_runs(metrics, name)
        if over is None:
            continue
        values, unit, verdicts = over
        stats = mean_interval(values)
        if stats is None:
            continue
        model, reference = _comparison_names(name)
        what = f"{model} vs {reference}: Δm" if unit == "%" else f"{model} − {reference}:"
        suffix = " %" if unit == "%" else f" {unit} of mean accuracy"
        if stats["std"] is None:
            lines.append(f"- {what} {stats['mean']:+.2f}{suffix} in the one run: no spread.")
            continue
        ahead = sum(v > 0 for v in values)
        line = (
            f"- {what} {stats['mean']:+.2f} ± {stats['std']:.2f}{suffix} over {stats['runs']} "
            f"runs ({_interval_text(stats['ci95'])} of the mean; {model} ahead in {ahead} of "
            f"{len(values)}): {verdict(stats['ci95'])}."
        )
        if verdicts:
            clear = sum(v != NO_CLEAR_DIFFERENCE for v in verdicts)
            line += f" Each run's own bootstrap: a clear difference in {clear} of {len(verdicts)}."
        lines.append(line)
    if not lines:
        return ""
    note = (
        "The spread over runs: mean ± sample standard deviation of each run's difference, and "
        "the 95 % interval of their mean from Student's t with runs − 1 degrees of freedom; an "
        "interval that holds 0 is no clear difference."
    )
    return "\n".join(["Differences over the runs:", "", *lines, "", note])
