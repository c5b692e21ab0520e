"""The sections a stage-two run adds to its ``report.md``, beside the tables and curves of
:func:`unirep.pipeline.report.write_report`.

Each section is a markdown block made from the run's ``metrics.json`` (and, for the qualitative
grid, the run's networks), empty where it has nothing to say: a note on an unlabelled split, the
Visual Decathlon comparison with the published results, how Δm was computed, the grid of
per-pixel predictions and the steps and files skipped. :func:`write_run_report` writes the
report of a finished run with all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import unirep.layout as layout
from unirep.data.streams import RunData
from unirep.metrics.classification import PUBLISHED_ACCURACY, official_decathlon_score
from unirep.pipeline.report import prediction_grid_figure, write_figure, write_report
from unirep.pipeline.saliency import saliency_section
from unirep.tasks import Task
from unirep.teachers.store import Teacher
from unirep.training.evaluator import Evaluator
from unirep.training.tracking import read_curves, report_curves, weighting_curves

GRID_FIGURE = layout.GRID_FIGURE
GRID_SAMPLES = 4


def write_run_report(run_dir: Path, metrics: dict[str, Any], grid: str) -> None:
    """Write ``run_dir/report.md`` of a finished run: its metrics, the curves of its logs, the
    task weighting where it moved, and this module's sections (``grid``: the markdown of
    :func:`qualitative_section`, already drawn)."""
    curves = read_curves(run_dir / layout.LOGS)
    write_report(
        run_dir,
        metrics,
        report_curves(curves),
        extra_sections=[
            unlabelled_note(metrics),
            published_comparison(metrics),
            delta_m_notes(metrics),
            saliency_section(run_dir, metrics, curves),
            grid,
            reliability_section(metrics),
        ],
        weighting=informative_weighting(weighting_curves(curves)),
    )


def informative_weighting(curves: dict[str, Any]) -> dict[str, Any]:
    """The phases whose task weights changed over training or that logged gradient cosines
    (a teacher's, or ``sum``'s, constant weights of 1 say nothing)."""
    keep = {}
    for phase, series in curves.items():
        moving = any(len({v for _, v in pts}) > 1 for pts in series.get("weight", {}).values())
        if (
            moving
            or any(series.get("gradcos", {}).values())
            or any(series.get("dominance", {}).values())
        ):
            keep[phase] = series
    return keep


def published_comparison(metrics: dict[str, Any]) -> str:
    """Markdown: our per-domain accuracies beside the published ResNet-26 rows (URL, IJCV 2023).

    Empty unless the run's tasks are official Visual Decathlon domains with measured accuracy.
    """
    tasks = metrics["tasks"]
    official = metrics["summary"].get("official_decathlon_score")
    if not official:
        return ""
    domains = list(tasks)
    header = "| model | " + " | ".join(domains) + " | mean | score |"
    rows = [header, "|:---|" + "---:|" * (len(domains) + 2)]
    for role, score in official.items():
        accs = [tasks[d][role]["accuracy"] * 100 for d in domains]
        cells = " | ".join(f"{a:.2f}" for a in accs)
        rows.append(f"| ours: {role} | {cells} | {sum(accs) / len(accs):.2f} | {score:.0f} |")
    for name in ("Finetune", "Parallel RA", "URL", "URL (RA)"):
        accs = [PUBLISHED_ACCURACY[name][d] for d in domains]
        cells = " | ".join(f"{a:.2f}" for a in accs)
        score = official_decathlon_score({d: PUBLISHED_ACCURACY[name][d] / 100 for d in domains})
        rows.append(f"| published: {name} | {cells} | {sum(accs) / len(accs):.2f} | {score:.0f} |")
    note = (
        "Scores use the official constants (γ = 2, E_max = 2 × the published Finetune error, "
        "1000 per domain); published rows are ResNet-26 test accuracies from Li, Liu & Bilen "
        "(IJCV 2023, Table 2), rescored on the domains of this run."
    )
    return (
        "## Visual Decathlon: ours beside the published results\n\n"
        + "\n".join(rows)
        + "\n\n"
        + note
    )


def unlabelled_note(metrics: dict[str, Any]) -> str:
    """Markdown, when no metric of the reported split could be computed (no labels)."""
    measured = any(
        v is not None for entry in metrics["tasks"].values() for v in entry["student"].values()
    )
    if measured:
        return ""
    return (
        f"## The {metrics['split']} split is unlabelled\n\n"
        "Its annotations carry no labels (e.g. Visual Decathlon's `*_test_stripped.json`), so no "
        "metric is computed on it: the tables show dashes. The predictions are in `results.json`, "
        "the file the official evaluation server takes. Model selection used the validation split."
    )


def reliability_section(metrics: dict[str, Any]) -> str:
    """Markdown: steps skipped for non-finite values and files skipped as corrupt, if any."""
    s = metrics["summary"]
    lines = []
    skipped = {r: n for r, n in s.get("skipped_steps", {}).items() if n}
    if skipped:
        lines.append(
            "Steps skipped for a non-finite loss or gradient (`train.on_nonfinite=skip`): "
            + ", ".join(f"{role} {n}" for role, n in skipped.items())
            + "."
        )
    files = s.get("skipped_files") or []
    if files:
        lines.append(f"Files skipped as corrupt (`data.on_corrupt=skip`): {len(files)}.\n")
        lines += [f"- `{f['path']}` ({f.get('split', '?')}): {f.get('reason', '')}" for f in files]
    if not lines:
        return ""
    return "## Skipped steps and files\n\n" + "\n".join(lines)


def delta_m_notes(metrics: dict[str, Any]) -> str:
    """Markdown: how Δm and selection were computed in this run."""
    s = metrics["summary"]
    if "delta_m_vs_teachers" not in s:
        return ""
    lines = [
        "## Δm against the teachers",
        "",
        "Δm = 100/T · Σ_t (−1)^l_t (M_t − M_teacher,t) / M_teacher,t over the main metric of "
        f"each task ({', '.join(s['delta_m_metrics'])}; l_t = 1 where lower is better), "
        f"on the {metrics['split']} split, against the single-task teachers of this run "
        "(Maninis et al. 2019). Positive is better than the teachers.",
        "",
        "| model | Δm (%) | Δm, all metrics (%) |",
        "|:---|---:|---:|",
    ]
    for role, prefix in (("student", ""), ("baseline (no distillation)", "baseline_")):
        if f"{prefix}delta_m_vs_teachers" not in s:
            continue
        every = s.get(f"{prefix}delta_m_all_metrics_vs_teachers")
        values = (s[f"{prefix}delta_m_vs_teachers"], every)
        cells = [f"{v:+.2f}" if v is not None else "–" for v in values]
        lines.append(f"| {role} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "Selection: teachers on their validation main metric, baseline and student on their "
        "validation score; the test split is never used for selection.",
    ]
    return "\n".join(lines)


def qualitative_section(
    run_dir: Path,
    evaluator: Evaluator,
    data: RunData,
    tasks: dict[str, Task],
    split: str,
    teachers: dict[str, Teacher],
    nets: dict[str, torch.nn.Module],
) -> str:
    """The grid of a few ``split`` images of the per-pixel tasks (ground truth, teacher,
    baseline, student); its markdown. Empty when the run has no per-pixel task."""
    spatial = {n: t for n, t in tasks.items() if t.kind.spatial}
    if not spatial:
        return ""
    stream = next(iter(spatial.values())).stream
    spatial = {n: t for n, t in spatial.items() if t.stream == stream}
    dataset = data.datasets(split)[stream]
    n = min(GRID_SAMPLES, len(dataset))  # type: ignore[arg-type]
    samples = [dataset[i] for i in range(n)]
    images = torch.stack([s["image"] for s in samples])
    truth = {
        t: torch.stack([s[task.target_key] for s in samples]).float()
        for t, task in spatial.items()
        if task.target_key in samples[0]
    }
    columns: dict[str, dict[str, torch.Tensor]] = {"ground truth": truth, "teacher": {}}
    for name, teacher in teachers.items():
        if name in spatial:
            columns["teacher"].update(
                evaluator.predictions(teacher.net, stream, images, {name: spatial[name]})
            )
    for role, net in nets.items():
        columns[role] = evaluator.predictions(net, stream, images, spatial)
    render = {t: task.render for t, task in spatial.items()}
    png = prediction_grid_figure(images, columns, list(spatial), render)
    write_figure(run_dir / GRID_FIGURE, png)
    return (
        f"## Qualitative results ({split} split)\n\n"
        f"First {n} images of the split; for each task: ground truth, the single-task teacher, "
        "the baseline and the distilled student. Black marks pixels without ground truth.\n\n"
        f"![Qualitative results]({GRID_FIGURE})"
    )
