"""Stage two for dense multi-task prediction: per-task teachers → baseline → distilled student.

The dense counterpart of :mod:`unirep.pipeline`, on the same trainer (:func:`unirep.trainer.fit`),
run directory, metrics.json shape, report and export. Per Li, Liu & Bilen (IJCV 2023, NYUv2):
one single-task teacher per task, a multi-task student (shared encoder, per-task decoders and
heads, optionally MTAN or DenseMTL cross-task attention) with two 1×1 alignment adapters per task,
trained with the task losses plus channel-normalised pixel-wise L2 to each teacher's last
decoder feature. The baseline is the same student without distillation.

Model selection never looks at the test split: teachers keep their best validation main metric,
baseline and student their best validation Δm against the teachers (measured on the same
validation split). Δm in metrics.json is on ``cfg.split`` (default ``test``) against the
teachers of the same run, over the three main metrics (mIoU, depth abs err, normal mean angle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from unirep import __version__
from unirep.config import Config, ConfigError, cache_dir
from unirep.data.dense_sets import DenseData, build_dense_data
from unirep.dense_eval import (
    MAIN_METRIC,
    DenseEvaluator,
    main_metrics,
    selection_delta_m,
)
from unirep.io import atomic_write_json, read_json, save_weights
from unirep.metrics import delta_m
from unirep.models.dense import ALIGN_PREFIX, DenseMultiTaskNet, build_dense_from_architecture
from unirep.models.network import count_parameters
from unirep.objective import build_dense_objective
from unirep.pipeline import (
    STUDENT_MANIFEST,
    fit_records,
    read_student,
    resume_point,
    teacher_records,
    teacher_root,
    teachers_of_student,
)
from unirep.report import dense_grid_figure, write_figure, write_report
from unirep.teachers import DenseTeacher, load_dense_teacher, teacher_dir
from unirep.tracking import read_curves, report_curves
from unirep.trainer import DenseIO, FitResult, Phase, fit

STREAM = "dense"  # the single training stream of a dense run
GRID_FIGURE = "qualitative.png"
GRID_SAMPLES = 4
DENSE_FORMAT = "unirep-dense-student/1"


# --------------------------------------------------------------------------------------------
# Set-up


def resolve_dense_data(cfg: Config, accelerator: Accelerator) -> DenseData:
    """The run's dense benchmark; mini-scenes are generated once, by the main process."""
    with accelerator.main_process_first():
        data = build_dense_data(cfg, cache_dir(cfg))
    return data


def dense_architecture(cfg: Config) -> dict[str, Any]:
    """What a teacher is built from (checked when a teacher is reused)."""
    assert cfg.dense is not None
    return {
        "encoder": cfg.dense.encoder.name,
        "encoder_kwargs": dict(cfg.dense.encoder.kwargs),
        "decoder_channels": cfg.dense.decoder_channels,
    }


def task_channels_for(tasks: list[str], num_classes: int) -> dict[str, int]:
    """Output channels per task, in MTAN order: ``num_classes`` logits, 1 depth, a 3-D normal."""
    channels = {"semantic": num_classes, "depth": 1, "normal": 3}
    return {t: channels[t] for t in ("semantic", "depth", "normal") if t in tasks}


def task_channels(data: DenseData) -> dict[str, int]:
    """Output channels per task of the run's data."""
    return task_channels_for(data.tasks, data.num_classes)


def sets(data: DenseData, split: str, train: bool = False) -> dict[str, Any]:
    """``{STREAM: dataset}``, the shape the trainer and evaluator take."""
    return {STREAM: data.dataset(split, train=train)}


def make_evaluator(cfg: Config, accelerator: Accelerator, data: DenseData) -> DenseEvaluator:
    return DenseEvaluator(
        accelerator, cfg.data.eval_batch_size, cfg.data.num_workers, data.num_classes
    )


def student_architecture(cfg: Config) -> dict[str, Any]:
    """The student's architecture record: the teachers' plus the cross-task module."""
    assert cfg.dense is not None
    cross = cfg.dense.cross_task
    return {
        **dense_architecture(cfg),
        "cross_task": cross.name if cross else None,
        "cross_task_kwargs": dict(cross.kwargs) if cross else {},
    }


def load_task_teacher(cfg: Config, data: DenseData, task: str) -> DenseTeacher:
    """One task's teacher, verified (task, channels, architecture, data fingerprint, weights)."""
    return load_dense_teacher(
        teacher_dir(teacher_root(cfg), cfg.preset, task),
        task,
        out_channels=task_channels(data)[task],
        architecture=dense_architecture(cfg),
        data_fingerprint=data.fingerprint(),
    )


def load_dense_teachers(cfg: Config, data: DenseData) -> dict[str, DenseTeacher]:
    """Every task's teacher, verified (see :func:`load_task_teacher`)."""
    return {task: load_task_teacher(cfg, data, task) for task in data.tasks}


def evaluate_dense_teachers(
    evaluator: DenseEvaluator, teachers: dict[str, DenseTeacher], split: str, data: DenseData
) -> dict[str, dict[str, Any]]:
    """Each single-task teacher's metrics for its own task on ``split``."""
    return {t: evaluator.evaluate(m.net, split, sets(data, split))[t] for t, m in teachers.items()}


def build_dense_student(
    cfg: Config, channels: dict[str, int], align_dims: dict[str, int] | None = None
) -> DenseMultiTaskNet:
    """The run's multi-task student for ``{task: output channels}`` (adapters: ``align_dims``)."""
    return build_dense_from_architecture(student_architecture(cfg), channels, align_dims)


# --------------------------------------------------------------------------------------------
# Stage two


def _student_phase(
    cfg: Config,
    name: str,
    data: DenseData,
    run_dir: Path,
    teachers: dict[str, DenseTeacher],
    teacher_val: dict[str, dict[str, Any]],
    distill: bool,
) -> Phase:
    assert cfg.dense is not None
    set_seed(cfg.seed)  # baseline and student share their initialisation and data order
    align = {t: teacher.feature_dim for t, teacher in teachers.items()} if distill else None
    net = build_dense_student(cfg, task_channels(data), align)
    checkpoint_dir = run_dir / "checkpoints" / name
    return Phase(
        name=name,
        net=net,
        objective=build_dense_objective(cfg.dense.tasks, cfg.distill, distill),
        train_sets=sets(data, "train", train=True),
        val_sets=sets(data, "val"),
        batch_sizes={STREAM: cfg.data.batch_size},
        cfg=cfg.train,
        checkpoint_dir=checkpoint_dir,
        log_dir=run_dir / "logs",
        seed=cfg.seed,
        teachers=teachers if distill else {},
        resume_from=resume_point(cfg, checkpoint_dir),
        num_workers=cfg.data.num_workers,
        batch_io=DenseIO(data.tasks),
        score=selection_delta_m(teacher_val),
        score_name="delta_m",
    )


def distill_dense(
    cfg: Config,
    accelerator: Accelerator,
    data: DenseData,
    run_dir: Path,
    teacher_seconds: float = 0.0,
) -> dict[str, Any]:
    """Train the baseline (optional) and the distilled student; evaluate, export and report."""
    evaluator = make_evaluator(cfg, accelerator, data)
    teachers = load_dense_teachers(cfg, data)
    for t in teachers.values():
        t.net.to(accelerator.device)
    teacher_val = evaluate_dense_teachers(evaluator, teachers, "val", data)
    split_sets = sets(data, cfg.split)
    results: dict[str, dict[str, Any]] = {
        "teacher": evaluate_dense_teachers(evaluator, teachers, cfg.split, data)
    }
    fits: dict[str, FitResult] = {}
    nets: dict[str, DenseMultiTaskNet] = {}
    for role, is_distilled in (("baseline", False), ("student", True)):
        if role == "baseline" and not cfg.baseline:
            continue
        phase = _student_phase(cfg, role, data, run_dir, teachers, teacher_val, is_distilled)
        fits[role] = fit(accelerator, phase, evaluator, progress=cfg.progress)
        nets[role] = phase.net
        results[role] = evaluator.evaluate(phase.net, cfg.split, split_sets)

    student = nets["student"]
    export_dense_student(
        cfg, accelerator, student, data, teachers, run_dir / "student", fits["student"]
    )
    metrics = build_dense_metrics(
        cfg,
        accelerator.num_processes,
        results,
        dense_parameter_counts(student, teachers),
        fits,
        teacher_seconds,
        student,
        data,
    )
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "metrics.json", metrics)
        grid = qualitative_section(run_dir, evaluator, data, cfg.split, teachers, nets)
        write_report(
            run_dir,
            metrics,
            report_curves(read_curves(run_dir / "logs")),
            extra_sections=[dense_notes(metrics), grid],
        )
    accelerator.wait_for_everyone()
    return metrics


def _delta(results: dict[str, Any], reference: dict[str, Any], all_metrics: bool) -> float | None:
    try:
        if all_metrics:
            clean = {t: {m: v for m, v in r.items() if v is not None} for t, r in results.items()}
            return delta_m(clean, reference)
        return delta_m(main_metrics(results), main_metrics(reference))
    except ValueError:  # a reference metric of 0, or nothing measured
        return None


def build_dense_metrics(
    cfg: Config,
    num_processes: int,
    results: dict[str, dict[str, Any]],
    params: dict[str, int],
    fits: dict[str, FitResult] | None = None,
    teacher_seconds: float = 0.0,
    student: DenseMultiTaskNet | None = None,
    data: DenseData | None = None,
) -> dict[str, Any]:
    """The metrics.json of a dense run (same shape as classification; see README).

    ``tasks[task][role][metric]``; ``summary.delta_m_vs_teachers`` is Δm (%) over the main
    metric of each task (mIoU ↑, depth abs err ↓, normal mean angle ↓) against the run's
    teachers; ``delta_m_all_metrics_vs_teachers`` averages every metric of every task instead
    (Vandenhende et al.'s variant).
    """
    roles = [r for r in ("student", "teacher", "baseline") if r in results]
    tasks = {t: {role: results[role][t] for role in roles} for t in results["student"]}
    summary: dict[str, Any] = {}
    teacher = results.get("teacher")
    for role in ("student", "baseline"):
        if role not in results:
            continue
        prefix = "" if role == "student" else "baseline_"
        for t, m in MAIN_METRIC.items():
            if t in results[role]:
                summary[f"{prefix}{t}_{m}"] = results[role][t].get(m)
        if teacher:
            summary[f"{prefix}delta_m_vs_teachers"] = _delta(results[role], teacher, False)
            summary[f"{prefix}delta_m_all_metrics_vs_teachers"] = _delta(
                results[role], teacher, True
            )
    if teacher:
        for t, m in MAIN_METRIC.items():
            if t in teacher:
                summary[f"teacher_{t}_{m}"] = teacher[t].get(m)
    summary["delta_m_metrics"] = [f"{t}/{m}" for t, m in MAIN_METRIC.items() if t in tasks]
    summary["params"] = params
    if cfg.dense is not None:
        cross = cfg.dense.cross_task
        summary["cross_task"] = cross.name if cross else None
    exchange = getattr(student, "exchange", None) if student is not None else None
    if exchange is not None and data is not None:
        h, w = data.dataset("test")[0]["image"].shape[-2:]
        # the decoder features the exchange reads are at the first encoder stage's resolution
        reduction = student.encoder.reductions[0]  # type: ignore[union-attr]
        pairs = len(exchange.tasks) * (len(exchange.tasks) - 1)
        summary["cross_task_attention_bytes_per_image"] = pairs * exchange.attention_bytes(
            1, h // reduction, w // reduction
        )
    summary.update(fit_records(fits or {}, teacher_seconds, "val_delta_m"))
    summary["num_processes"] = num_processes
    return {"preset": cfg.preset, "split": cfg.split, "tasks": tasks, "summary": summary}


def dense_parameter_counts(
    student: DenseMultiTaskNet, teachers: dict[str, DenseTeacher]
) -> dict[str, int]:
    """Exported student (no adapters), its alignment adapters, and all teachers together."""
    exported = count_parameters(student, exclude_prefix=ALIGN_PREFIX)
    return {
        "student": exported,
        "adapters": count_parameters(student) - exported,
        "teachers_total": sum(count_parameters(t.net) for t in teachers.values()),
    }


def dense_notes(metrics: dict[str, Any]) -> str:
    """Markdown: how Δm and selection were computed in this run."""
    s = metrics["summary"]
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
        value = s.get(f"{prefix}delta_m_vs_teachers")
        if f"{prefix}delta_m_vs_teachers" not in s:
            continue
        every = s.get(f"{prefix}delta_m_all_metrics_vs_teachers")
        cells = [f"{v:+.2f}" if v is not None else "–" for v in (value, every)]
        lines.append(f"| {role} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "Selection: teachers on their validation main metric, baseline and student on their "
        "validation Δm against the teachers; the test split is never used for selection.",
    ]
    if s.get("cross_task_attention_bytes_per_image"):
        lines.append(
            f"Cross-task attention ({s['cross_task']}): "
            f"{s['cross_task_attention_bytes_per_image'] / 1024:.1f} KiB of attention maps per "
            "image (fp32, all task pairs), bounded by the pooling whatever the resolution."
        )
    return "\n".join(lines)


def qualitative_section(
    run_dir: Path,
    evaluator: DenseEvaluator,
    data: DenseData,
    split: str,
    teachers: dict[str, DenseTeacher],
    nets: dict[str, DenseMultiTaskNet],
) -> str:
    """Write the grid of a few ``split`` images (ground truth and predictions); its markdown."""
    dataset = data.dataset(split)
    n = min(GRID_SAMPLES, len(dataset))  # type: ignore[arg-type]
    samples = [dataset[i] for i in range(n)]
    images = torch.stack([s["image"] for s in samples])
    columns: dict[str, dict[str, torch.Tensor]] = {"ground truth": {}}
    for task in data.tasks:
        if task in samples[0]:
            columns["ground truth"][task] = torch.stack([s[task] for s in samples]).float()
    columns["teacher"] = {}
    for teacher in teachers.values():
        columns["teacher"].update(evaluator.predictions(teacher.net, images))
    for role, net in nets.items():
        columns[role] = evaluator.predictions(net, images)
    png = dense_grid_figure(images, columns, data.tasks, data.num_classes)
    write_figure(run_dir / GRID_FIGURE, png)
    return (
        f"## Qualitative results ({split} split)\n\n"
        f"First {n} images of the split; for each task: ground truth, the single-task teacher, "
        "the baseline and the distilled student. Black marks pixels without ground truth.\n\n"
        f"![Qualitative results]({GRID_FIGURE})"
    )


# --------------------------------------------------------------------------------------------
# Export and evaluation of an exported dense student


def export_dense_student(
    cfg: Config,
    accelerator: Accelerator,
    net: DenseMultiTaskNet,
    data: DenseData,
    teachers: dict[str, DenseTeacher],
    directory: Path,
    result: FitResult,
) -> None:
    """``student/model.safetensors`` (no alignment adapters) and ``student/manifest.json``."""
    assert cfg.dense is not None
    if accelerator.is_main_process:
        digest = save_weights(directory / "model.safetensors", net.export_state())
        manifest = {
            "format": DENSE_FORMAT,
            "unirep_version": __version__,
            "preset": cfg.preset,
            "architecture": student_architecture(cfg),
            "tasks": {
                t: {"type": "dense", "out_channels": k, "main_metric": MAIN_METRIC[t]}
                for t, k in task_channels(data).items()
            },
            "class_names": data.class_names,
            "preprocessing": data.preprocessing(),
            "teachers": teacher_records(teachers),
            "selection": {
                "split": "val",
                "best_step": result.best_step,
                "val_delta_m": result.best_val,
            },
            "weights_sha256": digest,
        }
        atomic_write_json(directory / STUDENT_MANIFEST, manifest)
    accelerator.wait_for_everyone()


def is_dense_student(directory: Path) -> bool:
    """Whether ``directory`` holds an exported dense student."""
    path = Path(directory) / STUDENT_MANIFEST
    return path.is_file() and read_json(path, what="student manifest").get("format") == DENSE_FORMAT


def load_dense_student(directory: Path) -> tuple[DenseMultiTaskNet, dict[str, Any]]:
    """Rebuild an exported dense student (strict load, hash checked); returns (net, manifest)."""
    manifest, state = read_student(directory)
    channels = {t: spec["out_channels"] for t, spec in manifest["tasks"].items()}
    net = build_dense_from_architecture(manifest["architecture"], channels)
    net.load_state_dict(state, strict=True)
    net.eval()
    return net, manifest


def evaluate_dense_student(
    cfg: Config, accelerator: Accelerator, data: DenseData, run_dir: Path, student_dir: Path
) -> dict[str, Any]:
    """Evaluate an exported dense student on ``cfg.split`` (and its teachers, when found)."""
    net, manifest = load_dense_student(student_dir)
    net.to(accelerator.device)
    expected = task_channels(data)
    for task, spec in manifest["tasks"].items():
        if expected.get(task) != spec["out_channels"]:
            raise ConfigError(
                f"student {str(student_dir)!r} predicts {spec['out_channels']} channels for "
                f"{task!r}; the data/config has {expected.get(task, 'no such task')}"
            )
    evaluator = make_evaluator(cfg, accelerator, data)
    split_sets = sets(data, cfg.split)
    results: dict[str, Any] = {"student": evaluator.evaluate(net, cfg.split, split_sets)}
    teachers = teachers_of_student(accelerator, manifest, lambda: load_dense_teachers(cfg, data))
    if teachers:
        for teacher in teachers.values():
            teacher.net.to(accelerator.device)
        results["teacher"] = evaluate_dense_teachers(evaluator, teachers, cfg.split, data)
    metrics = build_dense_metrics(
        cfg, accelerator.num_processes, results, dense_parameter_counts(net, teachers)
    )
    metrics["student"] = str(student_dir)
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    return metrics
