"""Stage two, one recipe for every kind of run: teachers → baseline → student → evaluation →
export → report.

A Visual Decathlon run and a dense NYUv2 run go through the same functions: the tasks of the run
(:mod:`unirep.tasks`) say what differs. Model selection never looks at the test split: teachers
keep their best validation main metric, the baseline and the student their best validation score
(``classification.selection_metric``: mean accuracy, or Δm against the teachers' validation
results, which dense runs always use).
Δm in ``metrics.json`` is on ``cfg.split`` against the teachers of the same run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from unirep.config.schema import Config, Spec
from unirep.data.streams import RunData, build_run_data
from unirep.data.validation import check_against_data
from unirep.errors import ConfigError
from unirep.io import atomic_write_json, read_json
from unirep.metrics.classification import (
    PUBLISHED_ACCURACY,
    decathlon_score,
    delta_m,
    official_decathlon_score,
)
from unirep.models.build import architecture, build_network, count_parameters
from unirep.objective import Objective, build_cross_task_terms, build_joint_terms
from unirep.pipeline.export import (
    STUDENT_MANIFEST,
    export_student,
    load_student,
    student_preprocessing,
    student_tasks,
)
from unirep.pipeline.model_card import model_card, reproduce_command
from unirep.pipeline.report import prediction_grid_figure, write_figure, write_report
from unirep.pipeline.rundir import resume_point
from unirep.stage_one.keys import teacher_key, teacher_path
from unirep.tasks import Task, main_metrics
from unirep.teachers.output_cache import output_cache_summary
from unirep.teachers.provider import provide_teachers
from unirep.teachers.store import Teacher, load_teacher, teacher_folder
from unirep.training.evaluator import (
    Evaluator,
    Results,
    delta_m_score,
    mean_main_metric_score,
    mean_metric,
)
from unirep.training.tracking import log_final_metrics, read_curves, report_curves, weighting_curves
from unirep.training.trainable import TrainableModule
from unirep.training.trainer import FitResult, Phase, fit
from unirep.weighting import build_weighting

SUBMISSION = "results.json"
METRICS = "metrics.json"
GRID_FIGURE = "qualitative.png"
GRID_SAMPLES = 4


# --------------------------------------------------------------------------------------------
# Set-up


def resolve_data(cfg: Config, accelerator: Accelerator) -> RunData:
    """The run's data; generated benchmarks and statistics are made once, by the main process."""
    with accelerator.main_process_first():
        data = build_run_data(cfg)
        data.prepare()
        check_against_data(cfg, data, accelerator.num_processes)  # before any work
    return data


def load_teachers(
    cfg: Config, data: RunData, tasks: dict[str, Task], world_size: int = 1
) -> dict[str, Teacher]:
    """Every task's teacher, found by its key (:func:`unirep.stage_one.keys.teacher_key`) and
    verified against the data (classes, fingerprint, architecture, key, weights)."""
    return {
        name: load_teacher(
            teacher_path(cfg, data, name, world_size),
            task,
            architecture=architecture(cfg),
            data_fingerprint=data.fingerprint(name),
            key=teacher_key(cfg, data, name, world_size),
        )
        for name, task in tasks.items()
    }


def recorded_teachers(
    cfg: Config, data: RunData, tasks: dict[str, Task], manifest: dict[str, Any]
) -> dict[str, Teacher]:
    """The teachers an exported student records (by key), found under this config's
    ``teachers.root`` and verified; students exported before keys fall back to the config's."""
    records = manifest.get("teachers", {})
    if not all(records.get(t, {}).get("key") for t in tasks):
        return load_teachers(cfg, data, tasks)
    return {
        name: load_teacher(
            teacher_folder(cfg, name, records[name]["key"]),
            task,
            data_fingerprint=data.fingerprint(name),
            key=records[name]["key"],
        )
        for name, task in tasks.items()
    }


def evaluate_teachers(
    evaluator: Evaluator,
    teachers: dict[str, Teacher],
    tasks: dict[str, Task],
    split: str,
    data: RunData,
) -> Results:
    """Each teacher on its own task's ``split``."""
    sets = data.datasets(split)
    return {
        name: evaluator.evaluate(t.net, split, sets, {name: tasks[name]})[name]
        for name, t in teachers.items()
    }


def selection(cfg: Config, tasks: dict[str, Task], teacher_val: Results | None) -> tuple[Any, str]:
    """(score function, logged name) of the baseline's and the student's model selection."""
    if cfg.selection_metric == "delta_m":
        if teacher_val is None:
            raise ValueError("selection on Δm needs the teachers' validation results")
        return delta_m_score(tasks, teacher_val), "delta_m"
    return mean_main_metric_score(tasks), cfg.selection_metric


def student_phase(
    cfg: Config,
    accelerator: Accelerator,
    role: str,
    data: RunData,
    tasks: dict[str, Task],
    run_dir: Path,
    teachers: dict[str, Teacher],
    teacher_val: Results | None,
    distill: bool,
) -> tuple[Phase, dict[str, Any]]:
    """The baseline (``distill=False``) or the distilled student, ready for :func:`fit`, and
    the teacher-output cache's record (``{}`` when it is off)."""
    set_seed(cfg.seed)  # baseline and student share their initialisation and data order
    trunk_state = None
    source = cfg.classification.init_from_teacher if cfg.classification else None
    if source:
        if source not in teachers:
            raise ConfigError(
                f"config key 'classification.init_from_teacher': {source!r} is not a task of "
                f"this run ({', '.join(teachers)})"
            )
        trunk_state = teachers[source].net.trunk.state_dict()
    net = build_network(architecture(cfg, student=True), tasks, trunk_state)
    distill = distill and cfg.distill.enabled
    aligners = None
    if distill:
        dims = {t: teacher.feature_dim for t, teacher in teachers.items()}
        spec = cfg.classification.adapter if cfg.classification else Spec("linear")
        aligners = net.build_aligners(dims, spec.name, **spec.kwargs)
    joint: dict[str, nn.Module] = {}
    if role == "student" and cfg.dense is not None:  # the baseline stays plain supervised
        joint = build_joint_terms(cfg.dense.partial, tasks, net.encoder.channels[-1])
        joint.update(build_cross_task_terms(cfg.dense.transfer, tasks))
    weighting = build_weighting(cfg.weighting.name, list(tasks), **cfg.weighting.kwargs)
    objective = Objective(tasks, cfg.distill if distill else None, joint)
    module = TrainableModule(net, objective, weighting, aligners, cfg.train.diagnostics_every)
    score, score_name = selection(cfg, tasks, teacher_val)
    checkpoint_dir = run_dir / "checkpoints" / role
    provision = provide_teachers(cfg, accelerator, data, teachers if distill else {}, tasks,
                                 data.datasets("train", train=True), cfg.seed, role)  # fmt: skip
    phase = Phase(
        name=role,
        module=module,
        tasks=tasks,
        train_sets=provision.train_sets,
        val_sets=data.datasets("val"),
        batch_sizes=data.batch_sizes(),
        cfg=cfg.train,
        checkpoint_dir=checkpoint_dir,
        log_dir=run_dir / "logs",
        score=score,
        score_name=score_name,
        seed=cfg.seed,
        teachers=provision.outputs,
        resume_from=resume_point(cfg, checkpoint_dir),
        num_workers=cfg.data.num_workers,
        draws=provision.draws,
    )
    return phase, provision.cache


# --------------------------------------------------------------------------------------------
# Stage two


def stored(path: Path, accelerator: Accelerator, compute: Any) -> Any:
    """``compute()`` once: its JSON result is kept at ``path`` and read back on resume, so a
    finished evaluation is never recomputed (every process reads the same file)."""
    if path.is_file():
        return read_json(path, what="stored evaluation")
    value = compute()
    if accelerator.is_main_process:
        atomic_write_json(path, value)
    accelerator.wait_for_everyone()
    return value


def distill(
    cfg: Config,
    accelerator: Accelerator,
    data: RunData,
    run_dir: Path,
    teacher_seconds: float = 0.0,
) -> dict[str, Any]:
    """Train the baseline (optional) and the distilled student; evaluate, export and report.

    Resumable at any point: finished phases reload their best weights, stored evaluations are
    read back, an existing export is kept, and ``metrics.json`` is written last (its presence
    marks the run finished, see :func:`unirep.pipeline.rundir.run_finished`). The export follows the
    metrics, which its model card (``student/README.md``) holds.
    """
    evaluator = Evaluator(accelerator, cfg.data.eval_batch_size, cfg.data.num_workers)
    tasks = data.tasks()
    teachers = load_teachers(cfg, data, tasks, accelerator.num_processes)
    for t in teachers.values():
        t.net.to(accelerator.device)
    store = run_dir / "checkpoints"
    teacher_val = None
    if cfg.selection_metric == "delta_m":
        teacher_val = stored(
            store / "teacher" / "evaluation_val.json",
            accelerator,
            lambda: evaluate_teachers(evaluator, teachers, tasks, "val", data),
        )
    split_sets = data.datasets(cfg.split)
    results = {
        "teacher": stored(
            store / "teacher" / f"evaluation_{cfg.split}.json",
            accelerator,
            lambda: evaluate_teachers(evaluator, teachers, tasks, cfg.split, data),
        )
    }
    fits: dict[str, FitResult] = {}
    nets: dict[str, torch.nn.Module] = {}
    modules: dict[str, TrainableModule] = {}
    predictions: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    cache_summary = None  # teachers.output_cache
    for role, is_distilled in (("baseline", False), ("student", True)):
        if role == "baseline" and not cfg.baseline:
            continue
        phase, cache = student_phase(
            cfg, accelerator, role, data, tasks, run_dir, teachers, teacher_val, is_distilled
        )
        if cache:
            cache_summary = output_cache_summary(cfg, cache)
        fits[role] = fit(accelerator, phase, evaluator, progress=cfg.progress)
        net = nets[role] = phase.module.student
        modules[role] = phase.module
        if role == "student":  # its predictions make the submission
            results[role] = evaluator.evaluate(net, cfg.split, split_sets, tasks, keep=predictions)
        else:
            results[role] = stored(
                phase.checkpoint_dir / f"evaluation_{cfg.split}.json",
                accelerator,
                lambda net=net: evaluator.evaluate(net, cfg.split, split_sets, tasks),
            )

    full = full_label_teachers(cfg, data, tasks, accelerator.num_processes)
    if full:
        for t in full.values():
            t.net.to(accelerator.device)
        results[FULL_LABEL] = stored(
            store / "teacher" / f"evaluation_full_label_{cfg.split}.json",
            accelerator,
            lambda: evaluate_teachers(evaluator, full, tasks, cfg.split, data),
        )
    student, best = nets["student"], fits["student"]
    params = parameter_counts(student, teachers, modules["student"])
    metrics = build_metrics(cfg, tasks, accelerator.num_processes, results, params)
    metrics["summary"].update(fit_records(fits, teacher_seconds, cfg.selection_metric))
    metrics["summary"].update(data_records(data))
    if cache_summary is not None:
        metrics["summary"]["teacher_output_cache"] = cache_summary
    metrics["summary"].update(reference_records(cfg, data, tasks, results))
    if accelerator.is_main_process and not (run_dir / "student" / STUDENT_MANIFEST).is_file():
        command = reproduce_command(cfg, str(run_dir / "config.yaml"))
        export_student(
            run_dir / "student",
            student,
            preset=cfg.preset,
            architecture=architecture(cfg, student=True),
            tasks=tasks,
            preprocessing={s: data.preprocessing(s) for s in data.streams()},
            teachers=teachers,
            selection={
                "split": "val",
                "best_step": best.best_step,
                f"val_{cfg.selection_metric}": best.best_val,
            },
            card=lambda manifest: model_card(
                manifest, metrics, cfg, data_summary(cfg, data), command
            ),
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        entries = submission_entries(tasks, split_sets, predictions)
        if entries is not None:
            atomic_write_json(run_dir / SUBMISSION, entries)
        grid = qualitative_section(run_dir, evaluator, data, tasks, cfg.split, teachers, nets)
        curves = read_curves(run_dir / "logs")
        write_report(
            run_dir,
            metrics,
            report_curves(curves),
            extra_sections=[
                unlabelled_note(metrics),
                published_comparison(metrics),
                delta_m_notes(metrics),
                grid,
                reliability_section(metrics),
            ],
            weighting=informative_weighting(weighting_curves(curves)),
        )
        # before metrics.json: a kill in between logs them again on resume, never loses them
        log_final_metrics(accelerator, metrics, step=cfg.train.max_steps)
        atomic_write_json(run_dir / METRICS, metrics)  # last: the run is finished
    accelerator.wait_for_everyone()
    return metrics


def evaluate_student(
    cfg: Config, accelerator: Accelerator, data: RunData, run_dir: Path, student_dir: Path
) -> dict[str, Any]:
    """Evaluate an exported student on ``cfg.split`` (with the teachers it names, when found)."""
    net, manifest = load_student(student_dir)
    net.to(accelerator.device)
    for note in data.use_preprocessing(student_preprocessing(manifest)):
        accelerator.print(note)
    tasks = matching_tasks(student_tasks(manifest), data.tasks(), str(student_dir))
    evaluator = Evaluator(accelerator, cfg.data.eval_batch_size, cfg.data.num_workers)
    sets = data.datasets(cfg.split)
    predictions: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    results: dict[str, Results] = {
        "student": evaluator.evaluate(net, cfg.split, sets, tasks, keep=predictions)
    }
    teachers = teachers_of_student(
        accelerator, manifest, lambda: recorded_teachers(cfg, data, tasks, manifest)
    )
    if teachers:
        for t in teachers.values():
            t.net.to(accelerator.device)
        results["teacher"] = evaluate_teachers(evaluator, teachers, tasks, cfg.split, data)
    params = parameter_counts(net, teachers)
    metrics = build_metrics(cfg, tasks, accelerator.num_processes, results, params)
    metrics["student"] = str(student_dir)
    metrics["summary"].update(data_records(data))
    if accelerator.is_main_process:
        entries = submission_entries(tasks, sets, predictions)
        if entries is not None:
            atomic_write_json(run_dir / SUBMISSION, entries)
        log_final_metrics(accelerator, metrics, step=0)
        atomic_write_json(run_dir / METRICS, metrics)  # last: the evaluation is finished
    accelerator.wait_for_everyone()
    return metrics


def matching_tasks(
    mine: dict[str, Task], run_tasks: dict[str, Task], student: str
) -> dict[str, Task]:
    """The run's tasks that an exported student (predicting ``mine``) is evaluated on: each of
    its tasks must be in the run with the same kind and number of outputs (else a
    :class:`ConfigError` naming ``student``)."""
    for name, task in mine.items():
        theirs = run_tasks.get(name)
        # kinds compare by name: TASK_KINDS.build makes a new instance each time
        if theirs is None or (theirs.kind.name, theirs.out_channels) != (
            task.kind.name,
            task.out_channels,
        ):
            found = (
                "no such task" if theirs is None else f"{theirs.kind.name}, {theirs.out_channels}"
            )
            raise ConfigError(
                f"student {student!r} predicts {name!r} ({task.kind.name}, "
                f"{task.out_channels} outputs); the data/config has {found}"
            )
    return {n: run_tasks[n] for n in mine}


def data_summary(cfg: Config, data: RunData) -> dict[str, Any]:
    """What the model card says of the data: source, root and images per split and stream."""
    return {
        "source": cfg.data.source,
        "root": str(data.root),
        "images": {
            split: {s: len(d) for s, d in data.datasets(split).items()}  # type: ignore[arg-type]
            for split in ("train", "val", "test")
        },
    }


def teachers_of_student(
    accelerator: Accelerator, manifest: dict[str, Any], load: Any
) -> dict[str, Teacher]:
    """The teachers ``load()`` finds, if they are the ones the exported student records; else {}.

    Any teacher missing or not verifying, or a weights hash other than the student manifest's,
    leaves the teachers out (saying why): an exported student is evaluated without them.
    """
    try:
        teachers = load()
    except (FileNotFoundError, ValueError) as err:
        accelerator.print(f"teachers not evaluated: {err}")
        return {}
    recorded = {t: r["weights_sha256"] for t, r in manifest.get("teachers", {}).items()}
    if not all(recorded.get(t) == x.manifest["weights_sha256"] for t, x in teachers.items()):
        accelerator.print(
            "teachers not evaluated: they are not the ones this student was distilled from"
        )
        return {}
    return teachers


# --------------------------------------------------------------------------------------------
# metrics.json


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
    score (E_max = 2 × the teacher's error) are added.
    """
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
                pairs = {
                    t: (r["accuracy"], teacher[t]["accuracy"])
                    for t, r in results[role].items()
                    if r.get("accuracy") is not None
                    and teacher.get(t, {}).get("accuracy") is not None
                }
                summary[f"{prefix}decathlon_score"] = (
                    decathlon_score(
                        {t: a for t, (a, _) in pairs.items()}, {t: b for t, (_, b) in pairs.items()}
                    )[0]
                    if pairs
                    else None
                )
    if by_accuracy:
        for role in roles:  # the official score, for runs on the real Visual Decathlon domains
            official = official_decathlon_score(
                {t: r["accuracy"] for t, r in results[role].items()}
            )
            if official is not None:
                summary.setdefault("official_decathlon_score", {})[role] = official
        if teacher:
            summary["teacher_mean_accuracy"] = mean_metric(teacher, "accuracy")
    summary["delta_m_metrics"] = [f"{t}/{task.main_metric}" for t, task in tasks.items()]
    summary["params"] = {k: v for k, v in params.items() if k != "backbone_multiplier"}
    if "backbone_multiplier" in params:
        summary["backbone_multiplier"] = params["backbone_multiplier"]
    summary["weighting"] = cfg.weighting.name
    if cfg.dense is not None and cfg.dense.cross_task is not None:
        summary["cross_task"] = cfg.dense.cross_task.name
    summary["num_processes"] = num_processes
    return {"preset": cfg.preset, "split": cfg.split, "tasks": per_task, "summary": summary}


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
    if teachers:
        one = count_parameters(next(iter(teachers.values())).net.trunk)
        counts["backbone_multiplier"] = count_parameters(student.trunk) / one  # type: ignore[arg-type]
    return counts


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


# --------------------------------------------------------------------------------------------
# Report sections


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


FULL_LABEL = "full_label_teacher"
"""The role of the teachers trained on every label, beside a partially labelled run's own."""


def full_label_teachers(
    cfg: Config, data: RunData, tasks: dict[str, Task], world_size: int
) -> dict[str, Teacher]:
    """For a run with partial labels: the teachers the same config trains on every label, when
    all of them are in the cache (``{}`` otherwise, or when the run's labels are full)."""
    if cfg.dense is None or cfg.dense.partial.protocol == "full":
        return {}
    full_cfg = copy.deepcopy(cfg)
    assert full_cfg.dense is not None
    full_cfg.dense.partial.protocol, full_cfg.dense.partial.file = "full", None
    full_data = build_run_data(full_cfg)
    paths = {t: teacher_path(full_cfg, full_data, t, world_size) for t in tasks}
    if not all((p / "teacher.json").is_file() for p in paths.values()):
        return {}
    return load_teachers(full_cfg, full_data, tasks, world_size)


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
    """Summary entries about the data: whether the reported split is labelled and the files
    skipped as corrupt (``data.on_corrupt=skip``), listed with their reason."""
    return {"skipped_files": data.skipped()}


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
