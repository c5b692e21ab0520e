"""Stage two, one recipe for every kind of run: teachers → baseline → student → evaluation →
export → report.

A Visual Decathlon run and a dense NYUv2 run go through the same functions: the tasks of the run
(:mod:`unirep.tasks`) say what differs. Model selection never looks at the test split: teachers
keep their best validation main metric, the baseline and the student their best validation score
(``classification.selection_metric``: mean accuracy, or Δm against the teachers' validation
results, which dense runs always use).
Δm in ``metrics.json`` is on ``cfg.split`` against the teachers of the same run.

:func:`distill` reads as the recipe: each step is a function of this module, the content of
``metrics.json`` is assembled in :mod:`unirep.pipeline.results` and the report's sections are
made in :mod:`unirep.pipeline.report_sections` (their names are importable from here too).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

import unirep.layout as layout
from unirep.config.schema import Config, Spec
from unirep.data.streams import RunData, build_run_data
from unirep.data.validation import check_against_data
from unirep.errors import ConfigError
from unirep.io import atomic_write_json
from unirep.metrics.cost import inference_cost, input_shape
from unirep.models.build import architecture, build_network, count_parameters, exported
from unirep.objective import (
    Objective,
    build_cross_task_terms,
    build_joint_terms,
    build_saliency_terms,
)
from unirep.pipeline.branching import search_then_retrain
from unirep.pipeline.export import (
    STUDENT_MANIFEST,
    export_student,
    load_student,
    student_preprocessing,
    student_tasks,
)
from unirep.pipeline.model_card import model_card, reproduce_command
from unirep.pipeline.overlap import learn_with_auxiliary
from unirep.pipeline.progressive import fuse_progressively
from unirep.pipeline.pruning import prune_and_train
from unirep.pipeline.report_sections import GRID_FIGURE as GRID_FIGURE
from unirep.pipeline.report_sections import GRID_SAMPLES as GRID_SAMPLES
from unirep.pipeline.report_sections import delta_m_notes as delta_m_notes
from unirep.pipeline.report_sections import informative_weighting as informative_weighting
from unirep.pipeline.report_sections import published_comparison as published_comparison
from unirep.pipeline.report_sections import qualitative_section, write_run_report
from unirep.pipeline.report_sections import reliability_section as reliability_section
from unirep.pipeline.report_sections import unlabelled_note as unlabelled_note
from unirep.pipeline.results import (
    FULL_LABEL,
    build_metrics,
    data_records,
    distill_metrics,
    parameter_counts,
    submission_entries,
)
from unirep.pipeline.results import fit_records as fit_records
from unirep.pipeline.results import reference_records as reference_records
from unirep.pipeline.rundir import resume_point, stored
from unirep.pipeline.saliency import saliency_record
from unirep.stage_one.keys import teacher_key, teacher_path
from unirep.tasks import Task
from unirep.teachers.output_cache import output_cache_summary
from unirep.teachers.provider import provide_teachers
from unirep.teachers.store import Teacher, load_teacher, teacher_folder
from unirep.training.evaluator import Evaluator, Results, delta_m_score, mean_main_metric_score
from unirep.training.tracking import log_final_metrics
from unirep.training.trainable import TrainableModule
from unirep.training.trainer import FitResult, Phase, fit
from unirep.weighting import build_weighting

SUBMISSION = layout.SUBMISSION
METRICS = layout.METRICS

Predictions = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""``{task: (predictions, targets, ids)}`` of an evaluation that keeps them (the submission's)."""


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
    if not all((p / layout.TEACHER_MANIFEST).is_file() for p in paths.values()):
        return {}
    return load_teachers(full_cfg, full_data, tasks, world_size)


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
        name: evaluator.evaluate(t.net, split, sets, {name: tasks[name]}, per_image=True)[name]
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
    name: str | None = None,
    arch: dict[str, Any] | None = None,
) -> tuple[Phase, dict[str, Any]]:
    """The baseline (``distill=False``) or the distilled student, ready for :func:`fit`, and
    the teacher-output cache's record (``{}`` when it is off). ``name`` names the phase (its
    checkpoints and log; default ``role``), ``arch`` the network (default: the config's
    student, :func:`~unirep.models.build.architecture`)."""
    name = name or role
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
    net = build_network(arch or architecture(cfg, student=True), tasks, trunk_state)
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
        joint.update(build_saliency_terms(cfg.dense.saliency, tasks, net))
    weighting = build_weighting(cfg.weighting.name, list(tasks), **cfg.weighting.kwargs)
    objective = Objective(tasks, cfg.distill if distill else None, joint)
    module = TrainableModule(net, objective, weighting, aligners, cfg.train.diagnostics_every)
    score, score_name = selection(cfg, tasks, teacher_val)
    checkpoint_dir = layout.checkpoint_dir(run_dir, name)
    provision = provide_teachers(cfg, accelerator, data, teachers if distill else {}, tasks,
                                 data.datasets("train", train=True), cfg.seed, role)  # fmt: skip
    phase = Phase(
        name=name,
        module=module,
        tasks=tasks,
        train_sets=provision.train_sets,
        val_sets=data.datasets("val"),
        batch_sizes=data.batch_sizes(),
        cfg=cfg.train,
        checkpoint_dir=checkpoint_dir,
        log_dir=run_dir / layout.LOGS,
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


@dataclass
class StageTwo:
    """What every step of :func:`distill` shares: the run's config, accelerator, data and
    folder, the evaluator, the tasks and the verified teachers (on the device)."""

    cfg: Config
    accelerator: Accelerator
    data: RunData
    run_dir: Path
    evaluator: Evaluator
    tasks: dict[str, Task]
    teachers: dict[str, Teacher]


@dataclass
class Trained:
    """The trained phases of a run by role (``baseline`` when trained, then ``student``): their
    fits, networks and trainable modules, the student's predictions on the reported split and
    the teacher-output cache's summary (None when it is off)."""

    fits: dict[str, FitResult] = field(default_factory=dict)
    nets: dict[str, nn.Module] = field(default_factory=dict)
    modules: dict[str, TrainableModule] = field(default_factory=dict)
    predictions: Predictions = field(default_factory=dict)
    cache_summary: dict[str, Any] | None = None  # teachers.output_cache
    archs: dict[str, dict[str, Any]] = field(default_factory=dict)  # each role's network record
    stages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # PDF's groupings
    earlier_seconds: dict[str, float] = field(default_factory=dict)  # earlier stages' training
    _export: tuple[dict[str, Any], nn.Module] | None = None

    def export(self) -> tuple[dict[str, Any], nn.Module]:
        """(architecture record, network) the student is exported as
        (:func:`unirep.models.build.exported`: SMTL-Lite without what no task picked), made once
        for the metrics and the export."""
        if self._export is None:
            self._export = exported(self.nets["student"], self.archs["student"])
        return self._export


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
    run = set_up(cfg, accelerator, data, run_dir)
    teacher_val = teacher_validation(run)
    split_sets = data.datasets(cfg.split)
    results = {"teacher": teacher_evaluation(run, run.teachers, cfg.split)}
    trained = Trained()
    for role in phase_roles(cfg):  # the baseline (optional), then the distilled student
        phase = train_phase(run, trained, role, teacher_val)
        results[role] = evaluate_phase(run, trained, phase, split_sets)
    results.update(full_label_results(run))
    metrics = run_metrics(run, trained, results, teacher_seconds)
    if (
        accelerator.is_main_process
        and not (layout.student_dir(run_dir) / STUDENT_MANIFEST).is_file()
    ):
        export_run(run, trained, metrics)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_outputs(run, trained, split_sets, metrics)
    accelerator.wait_for_everyone()
    return metrics


def set_up(cfg: Config, accelerator: Accelerator, data: RunData, run_dir: Path) -> StageTwo:
    """The shared state of a run: its evaluator, its tasks and its teachers, loaded, verified
    (:func:`load_teachers`) and moved to the accelerator's device."""
    evaluator = Evaluator(accelerator, cfg.data.eval_batch_size, cfg.data.num_workers)
    tasks = data.tasks()
    teachers = on_device(load_teachers(cfg, data, tasks, accelerator.num_processes), accelerator)
    return StageTwo(cfg, accelerator, data, run_dir, evaluator, tasks, teachers)


def on_device(teachers: dict[str, Teacher], accelerator: Accelerator) -> dict[str, Teacher]:
    """``teachers``, each network moved to the accelerator's device."""
    for t in teachers.values():
        t.net.to(accelerator.device)
    return teachers


def teacher_evaluation(
    run: StageTwo, teachers: dict[str, Teacher], split: str, label: str = ""
) -> Results:
    """``teachers`` on ``split`` (:func:`evaluate_teachers`), stored once in the run's
    ``checkpoints/teacher/evaluation_<label><split>.json``."""
    return stored(
        layout.evaluation_file(
            layout.checkpoint_dir(run.run_dir, layout.TEACHER_PHASE), split, label
        ),
        run.accelerator,
        lambda: evaluate_teachers(run.evaluator, teachers, run.tasks, split, run.data),
    )


def teacher_validation(run: StageTwo) -> Results | None:
    """The teachers' stored evaluation on the validation split when the baseline and the student
    are selected on Δm (its reference, :func:`selection`); None otherwise."""
    if run.cfg.selection_metric != "delta_m":
        return None
    return teacher_evaluation(run, run.teachers, "val")


def phase_roles(cfg: Config) -> tuple[str, ...]:
    """The phases a run trains, in order: the baseline (when ``cfg.baseline``), the student."""
    return ("baseline", "student") if cfg.baseline else ("student",)


def train_phase(run: StageTwo, trained: Trained, role: str, teacher_val: Results | None) -> Phase:
    """Fit the baseline (``role="baseline"``, no distillation) or the distilled student and
    record its fit, network, architecture, module and teacher-output cache in ``trained``. A
    progressive-fusion student (``dense.sharing.name=pdf``) trains stage after stage
    (:func:`unirep.pipeline.progressive.fuse_progressively`), an AutoMTL one searches, then
    retrains what it chose (:func:`unirep.pipeline.branching.search_then_retrain`), a DiSparse
    one is pruned before it trains (:func:`unirep.pipeline.pruning.prune_and_train`), a pruned
    auxiliary one learns the union of the classes first
    (:func:`unirep.pipeline.overlap.learn_with_auxiliary`); the last phase is the role's."""
    arch = architecture(run.cfg, student=True)
    if arch.get("sharing") == "pdf":
        return fuse_progressively(run, trained, role, teacher_val, arch, fit_network)
    if arch.get("sharing") == "automtl":
        return search_then_retrain(run, trained, role, teacher_val, arch, fit_network)
    if arch.get("sharing") == "disparse":
        return prune_and_train(run, trained, role, teacher_val, arch, fit_network)
    if arch.get("sharing") == "pruned_auxiliary":
        return learn_with_auxiliary(run, trained, role, teacher_val, arch, fit_network)
    return fit_network(run, trained, role, teacher_val, arch, role)


def fit_network(
    run: StageTwo,
    trained: Trained,
    role: str,
    teacher_val: Results | None,
    arch: dict[str, Any],
    name: str,
    prepare: Callable[[Phase], None] | None = None,
) -> Phase:
    """Fit the network ``arch`` as ``role`` in the phase ``name`` (its checkpoints and log) and
    record it in ``trained`` under ``role``. ``prepare(phase)`` runs on the built phase before
    it trains (DiSparse prunes there; a checkpoint then loads over it); not for a finished phase,
    whose best weights hold what it prepared."""
    phase, cache = student_phase(
        run.cfg,
        run.accelerator,
        role,
        run.data,
        run.tasks,
        run.run_dir,
        run.teachers,
        teacher_val,
        role == "student",
        name=name,
        arch=arch,
    )
    if cache:
        trained.cache_summary = output_cache_summary(run.cfg, cache)
    if role in trained.fits:  # an earlier stage of the role (PDF, AutoMTL): its time counts too
        earlier = trained.fits[role]
        trained.earlier_seconds[role] = trained.earlier_seconds.get(role, 0.0) + earlier.seconds
    if prepare is not None and not (phase.checkpoint_dir / layout.DONE).exists():
        prepare(phase)  # a finished phase reloads its best weights (masks included) instead
    trained.fits[role] = fit(run.accelerator, phase, run.evaluator, progress=run.cfg.progress)
    trained.nets[role] = phase.module.student
    trained.modules[role] = phase.module
    trained.archs[role] = arch
    return phase


def evaluate_phase(
    run: StageTwo, trained: Trained, phase: Phase, split_sets: dict[str, Any]
) -> Results:
    """A trained phase's network on the reported split: the student's predictions are kept in
    ``trained`` (they make the submission), the baseline's evaluation is stored once."""
    net, split, tasks = phase.module.student, run.cfg.split, run.tasks
    if trained.nets.get("student") is net:
        return run.evaluator.evaluate(
            net, split, split_sets, tasks, keep=trained.predictions, per_image=True
        )
    return stored(
        layout.evaluation_file(phase.checkpoint_dir, split),
        run.accelerator,
        lambda: run.evaluator.evaluate(net, split, split_sets, tasks, per_image=True),
    )


def full_label_results(run: StageTwo) -> dict[str, Results]:
    """``{FULL_LABEL: results}`` of the full-label teachers on the reported split, when a
    partially labelled run finds them (:func:`full_label_teachers`); else ``{}``."""
    cfg, accelerator = run.cfg, run.accelerator
    full = full_label_teachers(cfg, run.data, run.tasks, accelerator.num_processes)
    if not full:
        return {}
    return {
        FULL_LABEL: teacher_evaluation(run, on_device(full, accelerator), cfg.split, "full_label_")
    }


def run_metrics(
    run: StageTwo, trained: Trained, results: dict[str, Results], teacher_seconds: float
) -> dict[str, Any]:
    """The run's ``metrics.json`` (:func:`unirep.pipeline.results.distill_metrics`), with the
    parameter counts of the student, its adapters and the teachers."""
    student, module = trained.nets["student"], trained.modules["student"]
    _, net = trained.export()
    params = parameter_counts(net, run.teachers, module)
    if net is not student:  # e.g. SMTL-Lite without the encoders no task picked
        params["student_trained"] = count_parameters(student)
    metrics = distill_metrics(
        run.cfg,
        run.data,
        run.tasks,
        run.accelerator.num_processes,
        results,
        params,
        trained.fits,
        teacher_seconds,
        trained.cache_summary,
    )
    summary = metrics["summary"]
    for role, seconds in trained.earlier_seconds.items():  # every stage of a staged role
        summary["phase_seconds"][role] += seconds
        summary["train_seconds"] += seconds
    stream = run.data.streams()[0]
    shape = input_shape(run.data.preprocessing(stream))
    if shape is not None:
        metrics["summary"]["inference"] = {"student": inference_cost(net, stream, shape)}
    record = getattr(student, "sharing_record", None)
    if record is not None:
        metrics["summary"]["sharing"] = record()
        if "student" in trained.stages:  # PDF: what each stage measured; AutoMTL: its search
            metrics["summary"]["sharing"]["stages"] = trained.stages["student"]
    relations = saliency_record(module, layout.log_file(run.run_dir, "student"))
    if relations is not None:  # SRDML: the task relation the student's objective learned
        summary["saliency"] = relations
    return metrics


def export_run(run: StageTwo, trained: Trained, metrics: dict[str, Any]) -> None:
    """Export the student into ``run_dir/student`` with its teachers, its validation selection
    and its model card (which holds ``metrics`` and the command that reproduces the run)."""
    cfg, data, run_dir, best = run.cfg, run.data, run.run_dir, trained.fits["student"]
    command = reproduce_command(cfg, str(run_dir / layout.CONFIG))
    arch, net = trained.export()
    export_student(
        layout.student_dir(run_dir),
        net,
        preset=cfg.preset,
        architecture=arch,
        tasks=run.tasks,
        preprocessing={s: data.preprocessing(s) for s in data.streams()},
        teachers=run.teachers,
        selection={
            "split": "val",
            "best_step": best.best_step,
            f"val_{cfg.selection_metric}": best.best_val,
        },
        card=lambda manifest: model_card(manifest, metrics, cfg, data_summary(cfg, data), command),
    )


def write_outputs(
    run: StageTwo, trained: Trained, split_sets: dict[str, Any], metrics: dict[str, Any]
) -> None:
    """The run's files, by the main process: the submission (``results.json``, when the run has
    per-image classification tasks), the report with its figures, the final metrics logged to
    the trackers and, last, ``metrics.json`` (the run is finished)."""
    entries = submission_entries(run.tasks, split_sets, trained.predictions)
    if entries is not None:
        atomic_write_json(run.run_dir / SUBMISSION, entries)
    grid = qualitative_section(
        run.run_dir, run.evaluator, run.data, run.tasks, run.cfg.split, run.teachers, trained.nets
    )
    write_run_report(run.run_dir, metrics, grid)
    # before metrics.json: a kill in between logs them again on resume, never loses them
    log_final_metrics(run.accelerator, metrics, step=run.cfg.train.max_steps)
    atomic_write_json(run.run_dir / METRICS, metrics)  # last: the run is finished


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
    predictions: Predictions = {}
    results: dict[str, Results] = {
        "student": evaluator.evaluate(net, cfg.split, sets, tasks, keep=predictions, per_image=True)
    }
    teachers = teachers_of_student(
        accelerator, manifest, lambda: recorded_teachers(cfg, data, tasks, manifest)
    )
    if teachers:
        on_device(teachers, accelerator)
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
