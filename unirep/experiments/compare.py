"""Variants × seeds on one preset, and one table: ``scripts/compare.py``.

A *variant* is a name and a list of config overrides. Each (variant, seed) is a whole run of the
stage-two recipe in its own folder ``<output_dir>/<name>/<variant>-seed<k>/`` (a finished one is
read back, never re-run, so an interrupted comparison continues where it stopped). The table has,
per variant, the mean ± std over seeds of every test metric of the student, of Δm against the
run's teachers and of Δm against the ``reference`` variant of the same seed (for partial labels:
the supervised multi-task model trained on the same labels, JTR's protocol). A variant named
``best-of:a,b`` resolves, once ``a`` and ``b`` have run, to whichever has the better mean
**validation** score (its selection record), never the test split.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import unirep.layout as layout
from unirep.errors import ConfigError
from unirep.experiments.jobs import Job, JobResult, run_jobs
from unirep.io import atomic_write_json, atomic_write_text
from unirep.metrics.classification import METRIC_HIGHER_IS_BETTER, delta_m
from unirep.pipeline.report import format_metric, write_figure
from unirep.pipeline.rundir import make_accelerator
from unirep.pipeline.validate import load_config
from unirep.stage_one.keys import finetune_source, teacher_path
from unirep.tasks import TASK_KINDS
from unirep.teachers.store import MANIFEST

COMPARISON = "comparison"
FRONT = "front"
FRONT_PREFIX = "static-"

PARTIAL_VARIANTS: dict[str, list[str]] = {
    "supervised": ["distill.enabled=false", "dense.partial.method=none"],
    "distill": ["dense.partial.method=none"],
    "mtpsl": ["distill.enabled=false", "dense.partial.method=mtpsl"],
    "jtr": ["distill.enabled=false", "dense.partial.method=jtr"],
    "distill+best-of:mtpsl,jtr": [],
}
"""The partial-label comparison on a partially labelled preset; ``supervised`` is the reference."""


XTASK_VARIANTS: dict[str, list[str]] = {
    "distill": ["dense.partial.method=none"],
    "+consistency": ["dense.partial.method=none", "dense.transfer.consistency.weight=0.1"],
    "+alignment": ["dense.partial.method=none", "dense.transfer.alignment.weight=0.1"],
    "+cycle": ["dense.partial.method=none", "dense.transfer.cycle.weight=0.1"],
    "+contrastive": ["dense.partial.method=none", "dense.transfer.contrastive.weight=0.1"],
    "+contrastive-distill": ["dense.partial.method=none", "distill.contrastive_weight=0.1"],
    "combine:+consistency,+alignment,+cycle,+contrastive,+contrastive-distill": [],
}
"""The cross-task ablation (on ``mini-scenes`` or ``mini-scenes-onelabel``): the
student with distillation alone (the reference), + each term, + the combination of the terms
that beat distillation alone on validation."""

_NO_DISTILL = "distill.enabled=false"
BALANCE_METHODS = ["uncertainty", "dwa", "famo", "mgda_ub", "pcgrad", "cagrad", "nash_mtl",
                   "gls", "stch", "gradvac", "graddrop", "fairgrad", "modo", "sdmgrad",
                   "dualproj", "excess_mtl", "config", "cr_mogm",
                   "moco", "db_mtl", "ntkmtl", "go4align"]  # fmt: skip
BALANCE_VARIANTS: dict[str, list[str]] = {
    "sum": [_NO_DISTILL, "weighting.name=sum"],
    **{m: [_NO_DISTILL, f"weighting.name={m}"] for m in BALANCE_METHODS},
    # STCH's warm-up and nadir phases scaled to the preset's 200 steps (defaults: 200 + 50)
    "stch": [_NO_DISTILL, "weighting={name: stch, kwargs: {warmup_steps: 40, nadir_steps: 10}}"],
    "adatask": [
        _NO_DISTILL,
        "weighting.name=adatask",
        "train.optim.optimizer={name: adatask, kwargs: {base: adam}}",
    ],
    "distill": ["weighting.name=sum"],
    f"distill+best-of:{','.join([*BALANCE_METHODS, 'adatask'])}": [],
    FRONT: [],
}
"""The task-balancing comparison (``mini-scenes-balance``): the multi-task model
with ``sum`` (the reference), with each balancing method, distillation alone, distillation with
the method that scored best on validation, and ``front``: a sweep of static task weights (the
scalarisation front every method is plotted against, Xin et al. and Kurin et al., NeurIPS 2022),
expanded from the run's tasks by :func:`front_variants`. The optimizer settings are the preset's
for every method (AdaTask: its Adam rule at the same learning rate, as its paper)."""

_SMTL = "dense.sharing={name: smtl, kwargs: {%s}}"
_WIDE = "dense.student_encoder={name: segnet, kwargs: {width_mult: 0.5}}"
_PDF = "dense.sharing={name: pdf, kwargs: {min_similarity: 0.95, max_blocks: 2}}"
_AUTOMTL = "dense.sharing={name: automtl, kwargs: {tau: 1.0, penalty: 0.05, policy_lr: 0.01}}"
SHARING_VARIANTS: dict[str, list[str]] = {
    "shared": ["dense.sharing=null", "dense.saliency=null"],
    "shared-plain": ["dense.sharing=null", "dense.saliency=null", _NO_DISTILL],
    "shared-wide": ["dense.sharing=null", _WIDE],
    "shared-wide-plain": ["dense.sharing=null", _WIDE, _NO_DISTILL],
    "smtl": [_SMTL % "gate: softmax"],
    "smtl-plain": [_SMTL % "gate: softmax", _NO_DISTILL],
    "smtl-private": [_SMTL % "gate: softmax, distill_from: private"],
    "smtl-sigmoid": [_SMTL % "gate: sigmoid"],
    "smtl-lite": [_SMTL % "gate: lite"],
    "smtl-lite-plain": [_SMTL % "gate: lite", _NO_DISTILL],
    "smtl-after": [_SMTL % "gate: softmax, after_decoders: true"],
    "pdf": [_PDF],
    "pdf-plain": [_PDF, _NO_DISTILL],
    "automtl": [_AUTOMTL],
    "automtl-plain": [_AUTOMTL, _NO_DISTILL],
}
"""What the tasks share (on ``mini-scenes`` or ``mini-scenes-smtl``): the shared-encoder student
(the reference) and SMTL's gates, each distilled and, for the shared encoder, the softmax gate
and the Lite gate, without distillation (``-plain``); ``smtl-private`` aligns each teacher with
its task's private encoder instead of the gated feature; ``shared-wide`` is the shared-encoder
student with a SegNet twice as wide (×0.5 instead of the preset's ×0.25: about the parameters
of SMTL's four encoders), the control for SMTL's extra capacity; ``pdf`` fuses the decoders'
first two blocks progressively (three trainings per run, see :mod:`unirep.pipeline.progressive`);
``automtl`` searches each task's choice at every encoder convolution, then retrains it (two
trainings per run, :mod:`unirep.pipeline.branching`)."""

_DISPARSE = "dense.sharing={name: disparse, kwargs: {mode: %s, sparsity: %s}}"
PRUNING_VARIANTS: dict[str, list[str]] = {
    "shared": SHARING_VARIANTS["shared"],
    "shared-plain": SHARING_VARIANTS["shared-plain"],
    "shared-2x": ["dense.sharing=null", "dense.saliency=null", "train.max_steps=800"],
    "disparse-static-90": [_DISPARSE % ("static", 0.9)],
    "disparse-static-90-plain": [_DISPARSE % ("static", 0.9), _NO_DISTILL],
    "disparse-static-70": [_DISPARSE % ("static", 0.7)],
    "disparse-pretrained-90": [_DISPARSE % ("pretrained", 0.9)],
    "disparse-dynamic-90": [_DISPARSE % ("dynamic", 0.9)],
}
"""DiSparse on ``mini-scenes`` (or ``mini-scenes-disparse``): the dense shared-encoder student
(the reference, the same runs as ``--variants sharing``'s when the comparison's ``--name`` is
shared) and DiSparse at 90 % and 70 % target sparsity, with the masks found at initialisation
(``static``), on the trained dense network then fine-tuned (``pretrained``: two trainings per
run) or pruned and regrown during training (``dynamic``), each distilled and, for the reference
and ``disparse-static-90``, without distillation (``-plain``); ``shared-2x`` is the dense student
trained twice as long, the control for ``pretrained``'s two trainings."""

_SRDML = "dense.saliency={weight: %s, relation_lr: 0.01, floor: 0.05}"
SALIENCY_VARIANTS: dict[str, list[str]] = {
    "shared": SHARING_VARIANTS["shared"],
    "shared-plain": SHARING_VARIANTS["shared-plain"],
    "srdml": [_SRDML % 0.1],
    "srdml-plain": [_SRDML % 0.1, _NO_DISTILL],
    "srdml-1": [_SRDML % 1.0],
}
"""SRDML's saliency relations on ``mini-scenes`` (or ``mini-scenes-srdml``): the student with the
regulariser at the reference's μ = 0.1 and at μ = 1, distilled, and at 0.1 without distillation,
against the shared-encoder student with and without distillation (the reference)."""

_PRUNED_AUX = (
    "classification.sharing={name: pruned_auxiliary, kwargs: {keep: %s, auxiliary_weight: %s}}"
)
OVERLAP_VARIANTS: dict[str, list[str]] = {
    "multi-task": ["classification.sharing=null"],
    "pruned-auxiliary": [_PRUNED_AUX % (0.5, 1.0)],
    "pruned-auxiliary-distill": [_PRUNED_AUX % (0.5, 1.0), "distill.enabled=true"],
    "pruned-auxiliary-keep-75": [_PRUNED_AUX % (0.75, 1.0)],
    "pruned-auxiliary-no-aux-loss": [_PRUNED_AUX % (0.5, 0.0)],
}
"""Overlapping label sets on ``mini-decathlon-overlap``: plain multi-task learning (the
reference; the single-task networks are each run's teachers, ``Δm vs teachers``) against the
pruned auxiliary network (half the units kept per task, the auxiliary loss beside in the joint
phase), the same distilled from the single-task teachers, keeping three quarters of the units,
and without the auxiliary loss in the joint phase (the preset's choice, on validation)."""

VARIANT_SETS = {
    "partial": PARTIAL_VARIANTS,
    "xtask": XTASK_VARIANTS,
    "balance": BALANCE_VARIANTS,
    "sharing": SHARING_VARIANTS,
    "pruning": PRUNING_VARIANTS,
    "saliency": SALIENCY_VARIANTS,
    "overlap": OVERLAP_VARIANTS,
}
"""Named variant lists for ``--variants`` (e.g. ``--variants xtask``)."""

RULES = ("best-of", "combine")


@dataclass
class Variant:
    name: str
    overrides: list[str]


def parse_variants(specs: list[str]) -> list[Variant]:
    """``name=override;override`` strings, the names of :data:`PARTIAL_VARIANTS` or
    :data:`XTASK_VARIANTS`, a set name of :data:`VARIANT_SETS`, or a derived variant:
    ``[distill+]best-of:a,b`` (whichever of the variants ``a``, ``b`` scores better on validation,
    with distillation switched on by the prefix) or ``combine:a,b,...`` (the overrides of every
    candidate whose mean validation score beats the reference variant's, together; the best one
    alone when none does)."""
    known = {name: o for variants in VARIANT_SETS.values() for name, o in variants.items()}
    variants: list[Variant] = []
    for spec in specs:
        if spec in VARIANT_SETS:
            variants += [Variant(n, list(o)) for n, o in VARIANT_SETS[spec].items()]
        elif _derived(spec) is not None:
            variants.append(Variant(spec, []))
        elif "=" in spec.split(";")[0]:
            name, rest = spec.split("=", 1)
            variants.append(Variant(name, [o for o in rest.split(";") if o]))
        elif spec in known:
            variants.append(Variant(spec, list(known[spec])))
        else:
            raise ConfigError(
                f"variant {spec!r}: write name=key=value;key=value, best-of:a,b, combine:a,b,..., "
                f"one of {', '.join(known)}, or a set: {', '.join(VARIANT_SETS)}"
            )
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names must be unique, got {names}")
    for variant in variants:
        derived = _derived(variant.name)
        if derived is None:
            continue
        prefix, rule, candidates = derived
        unknown = [c for c in candidates if c not in names or _derived(c) or c == FRONT]
        if len(candidates) < 2 or unknown or prefix not in ("", "distill+"):
            raise ConfigError(
                f"variant {variant.name!r}: write [distill+]{rule}:a,b,... with two or more "
                f"other variants of this comparison "
                f"({', '.join(n for n in names if not _derived(n))})"
            )
    return variants


def run_tasks(preset: str | None, overrides: list[str]) -> list[str]:
    """The task names of the run ``preset`` + ``overrides``, in the run's order."""
    from unirep.pipeline.stage_two import resolve_data

    cfg = load_config(preset, overrides)
    return list(resolve_data(cfg, make_accelerator(cfg)).tasks())


def front_variants(tasks: list[str], factors: tuple[float, ...] = (2.0, 4.0)) -> list[Variant]:
    """The static-weight sweep of the scalarisation front, without distillation: equal weights,
    then each task's weight raised by each factor (the others 1), normalised to sum to ``T`` (the
    ``sum`` scale). Named ``static-<w_1>-...-<w_T>`` by the unnormalised weights, in task order.
    With three tasks: ``1+2·3 = 7`` points."""
    grid = [[1.0] * len(tasks)]
    for i in range(len(tasks)):
        for factor in factors:
            grid.append([factor if j == i else 1.0 for j in range(len(tasks))])
    variants = []
    for raw in grid:
        total = sum(raw)
        weights = {t: round(w * len(tasks) / total, 6) for t, w in zip(tasks, raw, strict=True)}
        name = FRONT_PREFIX + "-".join(f"{w:g}" for w in raw)
        kwargs = ", ".join(f"{t}: {w}" for t, w in weights.items())
        spec = f"weighting={{name: static, kwargs: {{weights: {{{kwargs}}}}}}}"
        variants.append(Variant(name, [_NO_DISTILL, spec]))
    return variants


def expand_front(variants: list[Variant], tasks: list[str]) -> list[Variant]:
    """``variants`` with the ``front`` placeholder replaced by :func:`front_variants`."""
    out: list[Variant] = []
    for v in variants:
        out += front_variants(tasks) if v.name == FRONT else [v]
    return out


def _derived(name: str) -> tuple[str, str, list[str]] | None:
    """``(prefix, rule, candidates)`` of a ``[distill+]best-of:a,b`` or ``combine:a,b`` name."""
    for rule in RULES:
        if f"{rule}:" in name:
            prefix, _, rest = name.partition(f"{rule}:")
            return prefix, rule, [c for c in rest.split(",") if c]
    return None


def waits_for(variant: Variant, reference: str | None) -> list[str]:
    """The variants whose runs must finish (on every seed) before ``variant`` can be resolved."""
    derived = _derived(variant.name)
    if derived is None:
        return []
    needed = list(derived[2])
    if derived[1] == "combine" and reference is not None and reference not in needed:
        needed.append(reference)
    return needed


def validation_score(metrics: dict[str, Any]) -> float:
    """The student's best validation score (its selection record)."""
    record = metrics["summary"]["selection"]["student"]
    return float(next(v for k, v in record.items() if k.startswith("val_")))


def resolve(
    variant: Variant,
    variants: dict[str, Variant],
    results: dict[str, list[dict[str, Any]]],
    reference: str | None = None,
) -> tuple[list[str], str]:
    """The overrides of ``variant`` (a derived one: from its candidates' validation scores,
    never the test split), and a note saying what was chosen."""
    derived = _derived(variant.name)
    if derived is None:
        return variant.overrides, ""
    prefix, rule, candidates = derived
    missing = [c for c in waits_for(variant, reference) if c not in results]
    if missing:
        raise ConfigError(f"variant {variant.name!r}: run {', '.join(missing)} before it")
    scores = {c: statistics.fmean(validation_score(m) for m in results[c]) for c in candidates}
    best = max(scores, key=lambda c: scores[c])
    chosen = [best]
    if rule == "combine":
        if reference is None:
            raise ConfigError(f"variant {variant.name!r}: combine needs a reference variant")
        floor = statistics.fmean(validation_score(m) for m in results[reference])
        chosen = [c for c in candidates if scores[c] > floor] or [best]
    overrides: list[str] = []
    for c in chosen:
        overrides += [o for o in variants[c].overrides if o not in overrides]
    if prefix == "distill+":
        overrides = [o for o in overrides if not o.startswith("distill.enabled")]
        overrides.append("distill.enabled=true")
    overrides += variant.overrides
    note = ", ".join(f"{c} {s:+.3f}" for c, s in scores.items())
    if rule == "combine":
        note += f"; reference {reference} {floor:+.3f}"
    return overrides, f"{variant.name} → {' + '.join(chosen)} (mean validation score: {note})"


def _main_deltas(run: dict[str, Any], ref: dict[str, Any]) -> float | None:
    """Δm (%) of ``run``'s student over ``ref``'s student, on each task's main metric."""
    mine, theirs = {}, {}
    for task, entry in run["tasks"].items():
        metric = _main_metric(entry["student"])
        if metric is None or task not in ref["tasks"]:
            continue
        a, b = entry["student"].get(metric), ref["tasks"][task]["student"].get(metric)
        if a is None or not b:
            continue
        mine[task], theirs[task] = {metric: a}, {metric: b}
    return delta_m(mine, theirs) if mine else None


def _main_metric(results: dict[str, Any]) -> str | None:
    for kind in TASK_KINDS.names():
        metric = TASK_KINDS.build(kind).main_metric
        if metric in results:
            return metric
    return None


def _stat(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


_COST_COLUMNS = {
    "params": ("params", "student"),
    "nonzero_params": ("inference", "student", "nonzero_params"),
    "export_kib": ("export_kib",),
    "milliseconds_per_image": ("inference", "student", "milliseconds_per_image"),
    "student_seconds": ("phase_seconds", "student"),
}
"""The cost columns of a comparison: the exported student's parameters (all, and not zero), the
size of its weights file, its inference time per image and the student phase's wall-clock (its
steps and validations), from ``metrics.json`` (``export_kib`` is read from the run folder by
:func:`with_export_size`)."""


def _dig(record: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(record, dict):
            return None
        record = record.get(key)  # type: ignore[assignment]
    return record


def summarise(
    results: dict[str, list[dict[str, Any]]], reference: str | None
) -> dict[str, dict[str, Any]]:
    """Per variant: ``{"seeds", "<task>/<metric>": [mean, std], "delta_m_vs_teachers": ...,
    "delta_m_vs_<reference>": ...}`` over its runs (seeds in the same order for every variant)."""
    table: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        row: dict[str, Any] = {"seeds": len(runs)}
        for task, entry in runs[0]["tasks"].items():
            for metric in entry["student"]:
                values = [r["tasks"][task]["student"][metric] for r in runs]
                if all(v is not None for v in values):
                    row[f"{task}/{metric}"] = list(_stat(values))
        teachers = [r["summary"].get("delta_m_vs_teachers") for r in runs]
        if all(v is not None for v in teachers):
            row["delta_m_vs_teachers"] = list(_stat(teachers))
        for column, path in _COST_COLUMNS.items():
            values = [_dig(r["summary"], path) for r in runs]
            if all(isinstance(v, int | float) for v in values):
                row[column] = list(_stat([float(v) for v in values]))  # type: ignore[arg-type]
        if reference is not None and reference in results:
            deltas = [
                _main_deltas(run, ref) for run, ref in zip(runs, results[reference], strict=True)
            ]
            if deltas and all(d is not None for d in deltas):
                row[f"delta_m_vs_{reference}"] = list(_stat(deltas))  # type: ignore[arg-type]
        table[name] = row
    return table


def markdown(
    table: dict[str, dict[str, Any]], preset: str, seeds: list[int], notes: list[str]
) -> str:
    """The comparison as a markdown table (mean ± std over seeds)."""
    columns = list(dict.fromkeys(k for row in table.values() for k in row if k != "seeds"))
    header = ["variant", *[_label(c) for c in columns]]
    lines = [
        f"## Comparison on `{preset}` (seeds {', '.join(map(str, seeds))}; test split, "
        "mean ± std over seeds)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * len(columns)) + "|",
    ]
    for name, row in table.items():
        cells = []
        for c in columns:
            if c not in row:
                cells.append("–")
                continue
            mean, std = row[c]
            metric = c.split("/")[-1]
            if c in ("params", "nonzero_params"):
                cells.append(f"{mean / 1e3:,.0f} k")
            elif c == "export_kib":
                cells.append(f"{mean:,.0f}")
            elif c == "milliseconds_per_image":
                cells.append(f"{mean:.2f} ± {std:.2f}")
            elif c == "student_seconds":
                cells.append(f"{mean:.0f}")
            elif c.startswith("delta_m"):
                cells.append(f"{mean:+.2f} ± {std:.2f}")
            else:
                cells.append(f"{format_metric(metric, mean)} ± {format_metric(metric, std)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _label(column: str) -> str:
    if column == "delta_m_vs_teachers":
        return "Δm vs teachers (%)"
    if column.startswith("delta_m_vs_"):
        return f"Δm vs {column.removeprefix('delta_m_vs_')} (%)"
    return _COST_LABELS.get(column, column)


_COST_LABELS = {
    "params": "params (exported)",
    "nonzero_params": "non-zero params",
    "export_kib": "weights file (KiB)",
    "milliseconds_per_image": "ms / image",
    "student_seconds": "student phase (s)",
}


def figure(table: dict[str, dict[str, Any]], reference: str | None) -> bytes | None:
    """Bars of each variant's Δm (vs the reference variant, else vs the teachers) ± std."""
    key = f"delta_m_vs_{reference}" if reference else "delta_m_vs_teachers"
    rows = {n: r[key] for n, r in table.items() if key in r}
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.2))
    names = list(rows)
    means = [rows[n][0] for n in names]
    stds = [rows[n][1] for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4c72b0")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(_label(key))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _front_points(
    results: dict[str, list[dict[str, Any]]],
) -> tuple[list[tuple[str, str]], dict[str, dict[str, tuple[float, float]]]]:
    """The tasks' main metrics ``[(task, metric)]`` and, per variant, their ``(mean, std)`` over
    seeds on the test split."""
    first = next(iter(results.values()))[0]
    axes = [(t, m) for t, e in first["tasks"].items() if (m := _main_metric(e["student"]))]
    points: dict[str, dict[str, tuple[float, float]]] = {}
    for name, runs in results.items():
        values = {}
        for task, metric in axes:
            got = [r["tasks"][task]["student"].get(metric) for r in runs]
            if all(v is not None for v in got):
                values[task] = _stat([float(v) for v in got])
        if len(values) == len(axes):
            points[name] = values
    return axes, points


def dominated_by_front(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """For each variant off the static-weight sweep: the sweep points at least as good on every
    task's main metric (seed means) and better on one, i.e. the weightings it does not beat."""
    axes, points = _front_points(results)
    front = {n: p for n, p in points.items() if n.startswith(FRONT_PREFIX)}
    if not front:
        return []
    sign = {t: 1.0 if METRIC_HIGHER_IS_BETTER[m] else -1.0 for t, m in axes}
    notes = []
    for name, p in points.items():
        if name.startswith(FRONT_PREFIX):
            continue
        better = [
            f
            for f, q in front.items()
            if all(sign[t] * q[t][0] >= sign[t] * p[t][0] for t, _ in axes)
            and any(sign[t] * q[t][0] > sign[t] * p[t][0] for t, _ in axes)
        ]
        notes.append(
            f"{name}: dominated by the static weightings {', '.join(better)}"
            if better
            else f"{name}: not dominated by any static weighting of the sweep"
        )
    return notes


# tab20 without its greys (the sweep is grey): the 9 dark colours, then the 9 light ones
_TAB20 = [i for i in (*range(0, 20, 2), *range(1, 20, 2)) if i not in (14, 15)]


def front_figure(results: dict[str, list[dict[str, Any]]]) -> bytes | None:
    """Every pair of tasks' main metrics (test, mean ± std over seeds): the static-weight sweep
    in grey with its non-dominated points joined (the empirical scalarisation front of the pair),
    each other variant as a coloured marker. ``None`` without a sweep."""
    axes, points = _front_points(results)
    front = {n: p for n, p in points.items() if n.startswith(FRONT_PREFIX)}
    if not front or len(axes) < 2:
        return None
    import io
    from itertools import combinations

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(combinations(axes, 2))
    colours = matplotlib.colormaps["tab20"].colors
    fig, grid = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 4.0), squeeze=False)
    others = [n for n in points if n not in front]
    for ax, ((ta, ma), (tb, mb)) in zip(grid[0], pairs, strict=True):
        xs = {n: p[ta] for n, p in points.items()}
        ys = {n: p[tb] for n, p in points.items()}
        sx = 1.0 if METRIC_HIGHER_IS_BETTER[ma] else -1.0
        sy = 1.0 if METRIC_HIGHER_IS_BETTER[mb] else -1.0
        for n in front:
            ax.errorbar(xs[n][0], ys[n][0], xerr=xs[n][1], yerr=ys[n][1], fmt="o", color="0.6",
                        ms=4, capsize=2, zorder=1)  # fmt: skip
        best = [
            n for n in front
            if not any(sx * xs[m][0] >= sx * xs[n][0] and sy * ys[m][0] >= sy * ys[n][0]
                       and (xs[m][0], ys[m][0]) != (xs[n][0], ys[n][0]) for m in front)
        ]  # fmt: skip
        best.sort(key=lambda n: xs[n][0])
        ax.plot([xs[n][0] for n in best], [ys[n][0] for n in best], color="0.4", linewidth=1.2,
                label="static weights (front)", zorder=1)  # fmt: skip
        for k, n in enumerate(others):
            ax.errorbar(xs[n][0], ys[n][0], xerr=xs[n][1], yerr=ys[n][1], fmt="os^vD<>ph*"[k % 10],
                        color=colours[_TAB20[k % len(_TAB20)]], ms=6, capsize=2, label=n,
                        zorder=2)  # fmt: skip
        ax.set_xlabel(f"{ta} {ma} ({'↑' if sx > 0 else '↓'})")
        ax.set_ylabel(f"{tb} {mb} ({'↑' if sy > 0 else '↓'})")
        ax.grid(alpha=0.3)
    handles, labels = grid[0][0].get_legend_handles_labels()
    fig.tight_layout()
    # beside the panels, however long the names (the figure grows to hold it)
    legend = fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5),
                        fontsize=7)  # fmt: skip
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight",
                bbox_extra_artists=[legend])  # fmt: skip
    plt.close(fig)
    return buffer.getvalue()


def write_comparison(
    folder: Path,
    preset: str,
    seeds: list[int],
    results: dict[str, list[dict[str, Any]]],
    reference: str | None,
    notes: list[str],
    cost: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``comparison.{md,json,png}`` in ``folder``; returns the JSON's content. ``cost`` is what
    the invocation that wrote it spent (:func:`run_comparison`)."""
    table = summarise(results, reference)
    content = {
        "preset": preset,
        "seeds": seeds,
        "reference": reference,
        "variants": table,
        "notes": notes,
        "cost": cost,
    }
    atomic_write_json(folder / f"{COMPARISON}.json", content)
    if cost is not None:
        notes = [
            *notes,
            f"this invocation: {cost['wall_seconds'] / 60:.1f} min wall, {cost['workers']} "
            f"worker(s) × {cost['threads_per_worker']} thread(s), {len(cost['job_seconds'])} "
            f"jobs ({sum(cost['job_seconds'].values()) / 60:.1f} worker-minutes; a finished run "
            "is read back in about a second)",
        ]
    notes = [*notes, *dominated_by_front(results)]
    text = markdown(table, preset, seeds, notes)
    png = figure(table, reference)
    if png is not None:
        write_figure(folder / f"{COMPARISON}.png", png)
        text += f"\n![comparison]({COMPARISON}.png)\n"
    png = front_figure(results)
    if png is not None:
        write_figure(folder / f"{FRONT}.png", png)
        text += (
            f"\n![each method against the static-weight front]({FRONT}.png)\n\n"
            "Grey: the static task weightings of the sweep (joined: those no other sweep point "
            "beats on both tasks of the panel); coloured: the other variants (test split, mean ± "
            "std over seeds).\n"
        )
    atomic_write_text(folder / f"{COMPARISON}.md", text)
    return content


def with_export_size(metrics: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``metrics`` with the size of the run's exported weights file in KiB as
    ``summary.export_kib`` (where the export exists)."""
    weights = layout.student_dir(run_dir) / layout.WEIGHTS
    if weights.is_file() and isinstance(metrics.get("summary"), dict):
        metrics["summary"]["export_kib"] = weights.stat().st_size / 1024
    return metrics


# --------------------------------------------------------------------------------------------
# Running a comparison


def _run_name(name: str, variant: str, seed: int) -> str:
    return f"{name}/{variant.replace(':', '-').replace(',', '-')}-seed{seed}"


def _settings(overrides: list[str], extra: list[str], seed: int, run_name: str) -> list[str]:
    # the reference variant is the no-distillation model: no run needs its own baseline
    return ["baseline=false", *overrides, *extra, f"seed={seed}", f"name={run_name}"]


@dataclass(frozen=True)
class Runners:
    """How a comparison runs a whole run (``run(preset, overrides) -> metrics``) and trains one
    teacher into the cache (``teacher(preset, overrides, task, folder) -> cache folder``):
    module-level functions, so that worker processes can run them (the library never imports
    ``teachers/``: ``scripts/compare.py`` passes :mod:`unirep.pipeline.api`'s)."""

    run: Callable[[str | None, list[str]], dict[str, Any]]
    teacher: Callable[[str | None, list[str], str, str], str]


def _teacher_jobs(
    preset: str | None,
    settings: list[str],
    folder: Path,
    known: dict[str, str],
    train_teacher: Callable[..., str],
) -> tuple[list[Job], list[str]]:
    """Jobs training the teachers that ``preset`` + ``settings`` needs and the cache lacks, one
    per teacher, and the names of every teacher job the run must wait for (``known`` maps a
    cache folder to the job that trains it, so runs sharing a teacher share its job)."""
    from unirep.pipeline.stage_two import resolve_data

    cfg = load_config(preset, settings)
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)  # also generates an embedded benchmark, once
    jobs, after = [], []
    source = finetune_source(cfg)
    folders = {t: str(teacher_path(cfg, data, t, accelerator.num_processes)) for t in data.tasks()}
    for task in sorted(folders, key=lambda t: t != source):  # a fine-tuning source goes first
        cached = folders[task]
        if cached not in known and not (Path(cached) / MANIFEST).exists():
            known[cached] = f"teacher {Path(cached).name}"
            first = [known[folders[source]]] if source and source != task else []
            scratch = str(folder / "teachers" / f"seed{cfg.seed}")
            args = (preset, settings, task, scratch)
            jobs.append(Job(known[cached], train_teacher, args, [a for a in first if a]))
        if cached in known:
            after.append(known[cached])
    return jobs, after


def run_comparison(
    preset: str | None,
    variants: list[Variant],
    seeds: list[int],
    name: str,
    overrides: list[str],
    runners: Runners,
    workers: int = 1,
    log: Callable[[str], None] = print,
    reference: str | None = None,
) -> tuple[Path, dict[str, list[dict[str, Any]]], list[str], dict[str, Any]]:
    """Every (variant, seed) run of a comparison, as jobs on ``workers`` processes: first the
    teachers the cache lacks (one job each, shared by the runs that need them), then the runs,
    a derived one (``best-of``, ``combine``) once its candidates and, for ``combine``, the
    ``reference`` variant (default: the first) have finished on every seed. Finished runs are read
    back. Returns the comparison's folder, the runs' metrics per variant (seeds in order), the
    best-of notes and what this invocation cost (wall and per-job seconds)."""
    start = time.perf_counter()
    by_name = {v.name: v for v in variants}
    reference = reference if reference is not None else variants[0].name
    base = load_config(preset, overrides)
    folder = Path(base.output_dir) / name
    known: dict[str, str] = {}
    jobs: list[Job] = []
    notes: list[str] = []
    metrics: dict[str, dict[int, dict[str, Any]]] = {v.name: {} for v in variants}

    waiting = [v for v in variants if _derived(v.name)]
    # the critical path first: teachers, then the runs a derived variant waits for, then the
    # derived runs as soon as they can start; the other runs fill the idle workers
    critical = {c for v in waiting for c in waits_for(v, reference)}

    def run_jobs_of(variant: Variant, extra: list[str], seed: int) -> list[Job]:
        """The missing teachers' jobs, then the run waiting for them."""
        settings = _settings(overrides, extra, seed, _run_name(name, variant.name, seed))
        teachers, after = _teacher_jobs(preset, settings, folder, known, runners.teacher)
        rank = 1 if _derived(variant.name) else 2 if variant.name in critical else 3
        run = Job(f"{variant.name} seed {seed}", runners.run, (preset, settings), after, rank)
        return [*teachers, run]

    for variant in variants:
        if variant not in waiting:
            for seed in seeds:
                jobs.extend(run_jobs_of(variant, variant.overrides, seed))

    def on_done(job: str, result: JobResult) -> list[Job]:
        added: list[Job] = []
        if job.startswith("teacher "):
            return added
        variant, _, seed = job.rpartition(" seed ")
        run_dir = Path(base.output_dir) / _run_name(name, variant, int(seed))
        metrics[variant][int(seed)] = with_export_size(result.value, run_dir)
        log(f"[{job}] Δm vs teachers {result.value['summary'].get('delta_m_vs_teachers')}")
        complete = {n: [m[s] for s in seeds] for n, m in metrics.items() if len(m) == len(seeds)}
        for candidate in list(waiting):
            if all(c in complete for c in waits_for(candidate, reference)):
                extra, note = resolve(candidate, by_name, complete, reference)
                waiting.remove(candidate)
                same = [c for c in complete if by_name[c].overrides == extra]
                if same:  # the config of runs already made: the same numbers, not run again
                    metrics[candidate.name] = dict(zip(seeds, complete[same[0]], strict=True))
                    notes.append(f"{note}; the same config as {same[0]}, whose runs are reused")
                    continue
                notes.append(note)
                for seed in seeds:
                    added += run_jobs_of(candidate, extra, seed)
        return added

    results = run_jobs(jobs, workers, on_done=on_done, log=log)
    if waiting:
        raise ConfigError(f"variants {[v.name for v in waiting]}: their candidates never ran")
    ordered = {v.name: [metrics[v.name][s] for s in seeds] for v in variants}
    cost = {
        "wall_seconds": time.perf_counter() - start,
        "workers": workers,
        "threads_per_worker": torch.get_num_threads(),
        "job_seconds": {n: r.seconds for n, r in results.items()},
    }
    return folder, ordered, notes, cost
