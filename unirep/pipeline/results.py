"""What a stage-two run writes as results: the content of ``metrics.json`` and ``results.json``.

:func:`build_metrics` makes the run-directory contract's ``metrics.json`` (per-task metrics by
role, Δm and the Decathlon scores, how clear the student's differences are
(:func:`uncertainty_records`), parameter counts, the run's settings);
:func:`distill_metrics` adds what only a training run knows (the phases' seconds and selection,
the teacher-output cache, Δm against the baseline and full-label teachers, the label split).
:func:`submission_entries` makes the Visual Decathlon submission (``results.json``). Nothing here
trains, evaluates or writes a file: every function assembles values it is given.
"""

from __future__ import annotations

from typing import Any

import torch

from unirep.config.schema import Config
from unirep.data.streams import RunData
from unirep.metrics.classification import decathlon_score, delta_m, official_decathlon_score
from unirep.metrics.uncertainty import compare
from unirep.models.build import count_parameters
from unirep.tasks import Task, main_metrics
from unirep.teachers.store import Teacher
from unirep.training.evaluator import Results, mean_metric, per_image_records, without_per_image
from unirep.training.trainable import TrainableModule
from unirep.training.trainer import FitResult

FULL_LABEL = "full_label_teacher"
"""The role of the teachers trained on every label, beside a partially labelled run's own."""

COMPARISONS: dict[str, tuple[str, str]] = {
    "student_vs_baseline": ("student", "baseline"),
    "student_vs_teachers": ("student", "teacher"),
}
"""The differences ``summary.uncertainty`` measures: ``{name: (model, reference)}``."""


def _delta(tasks: dict[str, Task], results: Results, reference: Results, every: bool) -> Any:
    """Δm (%) over the main metrics (``every``: over every metric) of the tasks measured in both;
    None when nothing is comparable or a reference is 0."""
    if every:
        mine = {t: {m: v for m, v in r.items() if v is not None} for t, r in results.items()}
        ref = {
            t: {m: v for m, v in reference[t].items() if v is not None and m in mine[t]}
            for t in mine
            if t in reference
        }
        mine = {t: {m: v for m, v in mine[t].items() if m in ref[t]} for t in ref}
    else:
        ref = main_metrics(tasks, reference)
        mine = {t: m for t, m in main_metrics(tasks, results).items() if t in ref}
        ref = {t: m for t, m in ref.items() if t in mine}
    mine = {t: m for t, m in mine.items() if m}
    ref = {t: m for t, m in ref.items() if t in mine}
    if not mine:
        return None
    try:
        return delta_m(mine, ref)
    except ValueError:  # a reference metric of 0: the relative change is undefined
        return None


def build_metrics(
    cfg: Config,
    tasks: dict[str, Task],
    num_processes: int,
    results: dict[str, Results],
    params: dict[str, Any],
) -> dict[str, Any]:
    """The metrics.json of the run-directory contract (see README).

    ``results[role][task][metric]`` for roles ``student``, ``teacher``, ``baseline`` (any but
    ``student`` may be missing). Δm uses each task's main metric against the teachers of the
    same run; where every task is scored by accuracy, the mean accuracy and the Visual Decathlon
    score (E_max = 2 × the teacher's error) are added. Where the evaluations hold per-image sums
    (``evaluate(..., per_image=True)``), ``summary.uncertainty`` says how clear the student's
    differences are (:func:`uncertainty_records`); the sums themselves are not written.
    """
    records = {role: per_image_records(r) for role, r in results.items()}
    results = {role: without_per_image(r) for role, r in results.items()}
    roles = [r for r in ("student", "teacher", "baseline", FULL_LABEL) if r in results]
    per_task = {t: {role: results[role][t] for role in roles} for t in results["student"]}
    by_accuracy = all(t.main_metric == "accuracy" for t in tasks.values())
    teacher = results.get("teacher")
    summary: dict[str, Any] = {}
    for role in ("student", "baseline"):
        if role not in results:
            continue
        prefix = "" if role == "student" else "baseline_"
        if by_accuracy:
            summary[f"{prefix}mean_accuracy"] = mean_metric(results[role], "accuracy")
        if teacher:
            summary[f"{prefix}delta_m_vs_teachers"] = _delta(tasks, results[role], teacher, False)
            summary[f"{prefix}delta_m_all_metrics_vs_teachers"] = _delta(
                tasks, results[role], teacher, True
            )
            if by_accuracy:
                summary[f"{prefix}decathlon_score"] = _decathlon_score(results[role], teacher)
    if by_accuracy:
        for role in roles:  # the official score, for runs on the real Visual Decathlon domains
            official = official_decathlon_score(
                {t: r["accuracy"] for t, r in results[role].items()}
            )
            if official is not None:
                summary.setdefault("official_decathlon_score", {})[role] = official
        if teacher:
            summary["teacher_mean_accuracy"] = mean_metric(teacher, "accuracy")
    uncertainty = uncertainty_records(
        {t: tasks[t] for t in per_task if t in tasks}, records, by_accuracy
    )
    if uncertainty:
        summary["uncertainty"] = uncertainty
    summary["delta_m_metrics"] = [f"{t}/{task.main_metric}" for t, task in tasks.items()]
    summary["params"] = {k: v for k, v in params.items() if k != "backbone_multiplier"}
    if "backbone_multiplier" in params:
        summary["backbone_multiplier"] = params["backbone_multiplier"]
    summary["weighting"] = cfg.weighting.name
    if cfg.dense is not None and cfg.dense.cross_task is not None:
        summary["cross_task"] = cfg.dense.cross_task.name
    summary["num_processes"] = num_processes
    return {"preset": cfg.preset, "split": cfg.split, "tasks": per_task, "summary": summary}


def uncertainty_records(
    tasks: dict[str, Task], records: dict[str, dict[str, Any]], by_accuracy: bool
) -> dict[str, Any]:
    """``{comparison: record}`` of :data:`COMPARISONS` whose two models both have per-image sums
    for every task (:func:`unirep.metrics.uncertainty.compare`): the difference of the run's
    headline (mean accuracy in percentage points where every task is scored by accuracy, else
    Δm in % against the reference) with its paired-bootstrap 95 % interval and verdict, and per
    task (McNemar's exact test for accuracy)."""
    streams = {t: task.stream for t, task in tasks.items()}
    headline = "mean_accuracy" if by_accuracy else "delta_m"
    out: dict[str, Any] = {}
    for name, (model, reference) in COMPARISONS.items():
        if records.get(model) and records.get(reference):
            found = compare(records[model], records[reference], streams, headline)
            if found is not None:
                out[name] = found
    return out


def _decathlon_score(results: Results, teacher: Results) -> float | None:
    """The Visual Decathlon score of ``results`` with E_max = 2 × the teacher's error, over the
    tasks whose accuracy both measured (None when there is none)."""
    pairs = {
        t: (r["accuracy"], teacher[t]["accuracy"])
        for t, r in results.items()
        if r.get("accuracy") is not None and teacher.get(t, {}).get("accuracy") is not None
    }
    if not pairs:
        return None
    return decathlon_score(
        {t: a for t, (a, _) in pairs.items()}, {t: b for t, (_, b) in pairs.items()}
    )[0]


def distill_metrics(
    cfg: Config,
    data: RunData,
    tasks: dict[str, Task],
    num_processes: int,
    results: dict[str, Results],
    params: dict[str, Any],
    fits: dict[str, FitResult],
    teacher_seconds: float,
    cache_summary: dict[str, Any] | None,
) -> dict[str, Any]:
    """The metrics.json of a training run: :func:`build_metrics`, then in its summary the
    phases' records (:func:`fit_records`), the data's (:func:`data_records`), the teacher-output
    cache's settings (``cache_summary``, when the cache is on) and the references beside the
    teachers (:func:`reference_records`)."""
    metrics = build_metrics(cfg, tasks, num_processes, results, params)
    results = {role: without_per_image(r) for role, r in results.items()}
    metrics["summary"].update(fit_records(fits, teacher_seconds, cfg.selection_metric))
    metrics["summary"].update(data_records(data))
    if cache_summary is not None:
        metrics["summary"]["teacher_output_cache"] = cache_summary
    metrics["summary"].update(reference_records(cfg, data, tasks, results))
    return metrics


def fit_records(fits: dict[str, FitResult], teacher_seconds: float, score: str) -> dict[str, Any]:
    """Summary entries of the trained phases: total and per-phase seconds, the val selection."""
    records: dict[str, Any] = {
        "train_seconds": teacher_seconds + sum(f.seconds for f in fits.values())
    }
    if fits:
        records["phase_seconds"] = {role: f.seconds for role, f in fits.items()}
        records["skipped_steps"] = {role: f.skipped_steps for role, f in fits.items()}
        records["selection"] = {
            role: {"split": "val", "best_step": f.best_step, f"val_{score}": f.best_val}
            for role, f in fits.items()
        }
    return records


def parameter_counts(
    student: torch.nn.Module,
    teachers: dict[str, Teacher],
    module: TrainableModule | None = None,
) -> dict[str, Any]:
    """Exported student, its alignment adapters, all teachers together, and (the "#par" of the
    Decathlon tables) the student's trunk over one teacher's trunk."""
    counts: dict[str, Any] = {
        "student": count_parameters(student),
        "teachers_total": sum(count_parameters(t.net) for t in teachers.values()),
    }
    if module is not None:
        counts["adapters"] = count_parameters(module.aligners)
    if teachers and getattr(student, "trunk", None) is not None:
        one = count_parameters(next(iter(teachers.values())).net.trunk)
        counts["backbone_multiplier"] = count_parameters(student.trunk) / one  # type: ignore[arg-type]
    return counts


def reference_records(
    cfg: Config, data: RunData, tasks: dict[str, Task], results: dict[str, Results]
) -> dict[str, Any]:
    """Δm of the student against the baseline (the supervised multi-task model on the same
    labels: JTR's protocol) and against full-label teachers when measured; the label split."""
    records: dict[str, Any] = {}
    if "baseline" in results:
        records["delta_m_vs_baseline"] = _delta(
            tasks, results["student"], results["baseline"], False
        )
    if FULL_LABEL in results:
        for role, prefix in (("student", ""), ("baseline", "baseline_")):
            if role in results:
                records[f"{prefix}delta_m_vs_full_label_teachers"] = _delta(
                    tasks, results[role], results[FULL_LABEL], False
                )
    part = cfg.dense.partial if cfg.dense is not None else None
    if part is not None and (part.protocol != "full" or part.method != "none"):
        records["partial"] = {
            "protocol": part.protocol,
            "method": part.method,
            "distillation": cfg.distill.enabled,
            "labels": data.label_summary(),
        }
    return records


def data_records(data: RunData) -> dict[str, Any]:
    """Summary entries about the data: whether the reported split is labelled, the files
    skipped as corrupt (``data.on_corrupt=skip``), listed with their reason, and the tasks
    carved from the domains (``carving``, when ``classification.overlap`` is set)."""
    records: dict[str, Any] = {"skipped_files": data.skipped()}
    carving = getattr(data, "carving_summary", None)
    if carving is not None:
        records["carving"] = carving()
    return records


def submission_entries(
    tasks: dict[str, Task],
    sets: dict[str, Any],
    predictions: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> list[dict[str, int]] | None:
    """The Visual Decathlon submission ``[{"image_id", "category_id"}]`` over every per-image
    classification task (None when the run has none). Ids are the annotation files' own;
    entries are sorted by image id; predictions were gathered without padding duplicates."""
    entries = []
    found = False
    for name, (preds, _, ids) in predictions.items():
        task = tasks[name]
        if task.kind.spatial or not task.kind.has_classes:
            continue
        found = True
        dataset = sets[task.stream]
        entries += [
            {"image_id": int(i), "category_id": dataset.category_id(int(p))}
            for p, i in zip(preds.tolist(), ids.tolist(), strict=True)
        ]
    return sorted(entries, key=lambda e: e["image_id"]) if found else None
