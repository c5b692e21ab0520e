"""Stage two, end to end: load teachers → baseline → distilled student → evaluate → export → report.

The scripts are thin wrappers around these functions. Distribution lives in one place: the
``Accelerator`` built by :func:`make_accelerator` (CPU processes use gloo; ``cpu=True`` is set where
no CUDA exists so that ``accelerate launch --multi_gpu --num_processes 2`` really shares the work).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from unirep import __version__
from unirep.config import Config, ConfigError, cache_dir, save_config, to_dict
from unirep.data.sources import DomainSet, build_domains
from unirep.io import atomic_write_json, file_sha256, load_weights, read_json, save_weights
from unirep.metrics import (
    PUBLISHED_ACCURACY,
    decathlon_score,
    delta_m,
    official_decathlon_score,
)
from unirep.models.network import MultiDomainNet, build_network, count_parameters
from unirep.objective import build_objective
from unirep.report import write_report
from unirep.teachers import Teacher, load_teacher, teacher_dir
from unirep.tracking import read_curves, report_curves
from unirep.trainer import Evaluator, FitResult, Phase, fit, mean_metric

STUDENT_MANIFEST = "manifest.json"
T = TypeVar("T")
SUBMISSION = "results.json"


# --------------------------------------------------------------------------------------------
# Set-up shared by every script


def make_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator: CUDA when present (unless ``cpu=true``), else CPU processes."""
    return Accelerator(
        cpu=cfg.cpu or not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision
    )


def prepare_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """``<output_dir>/<name>/``, created (or found, when resuming) with the resolved config."""
    if cfg.resume and isinstance(cfg.resume, str) and cfg.resume not in ("latest",):
        checkpoint = Path(cfg.resume)
        if not (checkpoint / "trainer_state.json").is_file():
            raise ConfigError(
                f"config key 'resume': {cfg.resume!r} is not a checkpoint folder "
                "(expected <run>/checkpoints/<phase>/step_NNNNNN/trainer_state.json)"
            )
        directory = checkpoint.parents[2]
        cfg.name = directory.name
        cfg.output_dir = str(directory.parent)
    elif cfg.resume:
        if not cfg.name:
            raise ConfigError("resume=true needs the run's name (name=<run name>) to find it")
        directory = Path(cfg.output_dir) / cfg.name
        if not directory.is_dir():
            raise ConfigError(f"resume=true but the run folder {str(directory)!r} does not exist")
    else:
        if not cfg.name:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            # every process must agree on the name: take the main process's
            names = [f"{cfg.preset}-{stamp}"]
            if accelerator.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(names)
            cfg.name = names[0]
        directory = Path(cfg.output_dir) / cfg.name
    if cfg.resume:
        _check_same_config(cfg, directory / "config.yaml")
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        save_config(cfg, directory / "config.yaml")
    accelerator.wait_for_everyone()
    return directory


RESUME_MAY_CHANGE = {"resume", "name", "output_dir", "progress"}


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _check_same_config(cfg: Config, saved_path: Path) -> None:
    """A resumed run must use the config it started with (same command plus ``resume=``)."""
    if not saved_path.is_file():
        raise ConfigError(f"cannot resume: {str(saved_path)!r} does not exist")
    saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
    now = _flatten(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    changed = sorted(
        k
        for k in set(saved) | set(now)
        if k.split(".")[0] not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k)
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
        raise ConfigError(
            f"cannot resume {str(saved_path.parent)!r} with a different config ({details}); "
            "repeat the original command with resume=true"
        )


def resolve_domains(cfg: Config, accelerator: Accelerator) -> DomainSet:
    """The run's domains; a synthetic benchmark is generated once, by the main process."""
    with accelerator.main_process_first():
        domains = build_domains(cfg.data, cache_dir(cfg))
        for domain in domains.domains:  # computed (and cached) once, then read by the others
            domains.mean_std(domain)
    return domains


def data_fingerprint(domains: DomainSet, domain: str) -> str:
    """sha256 of the domain's training annotations: ties a teacher to the data it saw."""
    return domains.fingerprint(domain)


def architecture(cfg: Config) -> dict[str, Any]:
    return {"backbone": cfg.model.backbone, "backbone_kwargs": dict(cfg.model.backbone_kwargs)}


def teacher_root(cfg: Config) -> Path:
    return (
        Path(cfg.teachers.root).expanduser() if cfg.teachers.root else cache_dir(cfg) / "teachers"
    )


def resume_point(cfg: Config, checkpoint_dir: Path) -> Path | None:
    """The checkpoint named by ``resume=<dir>`` when it belongs to this phase."""
    if isinstance(cfg.resume, str) and cfg.resume not in ("latest",):
        path = Path(cfg.resume)
        if path.parent.resolve() == Path(checkpoint_dir).resolve():
            return path
    return None


# --------------------------------------------------------------------------------------------
# Stage two


def load_domain_teacher(cfg: Config, domains: DomainSet, domain: str) -> Teacher:
    """One domain's teacher, verified against the data (classes, fingerprint, architecture)."""
    return load_teacher(
        teacher_dir(teacher_root(cfg), cfg.preset, domain),
        domain,
        num_classes=domains.dataset(domain, "train").num_classes,
        architecture=architecture(cfg),
        data_fingerprint=data_fingerprint(domains, domain),
    )


def load_teachers(cfg: Config, domains: DomainSet) -> dict[str, Teacher]:
    """Every domain's teacher, verified (see :func:`load_domain_teacher`)."""
    return {domain: load_domain_teacher(cfg, domains, domain) for domain in domains.domains}


def build_student(
    cfg: Config,
    num_classes: dict[str, int],
    teacher_dims: dict[str, int],
    distill: bool,
    backbone_state: dict[str, torch.Tensor] | None = None,
) -> MultiDomainNet:
    """The run's student (``distill``: with alignment adapters) or its no-distillation twin."""
    return build_network(
        cfg.model.backbone,
        cfg.model.backbone_kwargs,
        num_classes,
        adapter=cfg.model.adapter.name if distill else None,
        adapter_kwargs=cfg.model.adapter.kwargs,
        teacher_dims=teacher_dims,
        residual_adapters=cfg.model.residual_adapters,
        backbone_state=backbone_state,
    )


def _student_phase(
    cfg: Config,
    name: str,
    domains: DomainSet,
    run_dir: Path,
    teachers: dict[str, Teacher],
    distill: bool,
) -> Phase:
    set_seed(cfg.seed)  # baseline and student share their initialisation and data order
    num_classes = {d: t.manifest["num_classes"] for d, t in teachers.items()}
    backbone_state = None
    if cfg.distill.init_from_teacher:
        source = cfg.distill.init_from_teacher
        if source not in teachers:
            raise ConfigError(
                f"config key 'distill.init_from_teacher': {source!r} is not a domain of this run "
                f"({', '.join(teachers)})"
            )
        backbone_state = teachers[source].net.backbone.state_dict()
    teacher_dims = {d: t.feature_dim for d, t in teachers.items()}
    net = build_student(cfg, num_classes, teacher_dims, distill, backbone_state)
    checkpoint_dir = run_dir / "checkpoints" / name
    return Phase(
        name=name,
        net=net,
        objective=build_objective(cfg.distill, distill),
        train_sets=domains.datasets("train", train=True),
        val_sets=domains.datasets("val"),
        batch_sizes={d: domains.batch_size(d) for d in domains.domains},
        cfg=cfg.train,
        checkpoint_dir=checkpoint_dir,
        log_dir=run_dir / "logs",
        seed=cfg.seed,
        teachers=teachers if distill else {},
        resume_from=resume_point(cfg, checkpoint_dir),
        num_workers=cfg.data.num_workers,
    )


def distill(
    cfg: Config,
    accelerator: Accelerator,
    domains: DomainSet,
    run_dir: Path,
    teacher_seconds: float = 0.0,
) -> dict[str, Any]:
    """Train the baseline (optional) and the distilled student; evaluate, export and report."""
    evaluator = Evaluator(accelerator, cfg.data.eval_batch_size, cfg.data.num_workers)
    teachers = load_teachers(cfg, domains)
    for t in teachers.values():
        t.net.to(accelerator.device)
    split_sets = domains.datasets(cfg.split)

    results = {"teacher": evaluate_teachers(evaluator, teachers, cfg.split, split_sets)}
    fits: dict[str, FitResult] = {}
    nets: dict[str, MultiDomainNet] = {}
    predictions: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for role, is_distilled in (("baseline", False), ("student", True)):
        if role == "baseline" and not cfg.baseline:
            continue
        phase = _student_phase(cfg, role, domains, run_dir, teachers, is_distilled)
        fits[role] = fit(accelerator, phase, evaluator, progress=cfg.progress)
        nets[role] = phase.net
        keep = predictions if role == "student" else None
        results[role] = evaluator.accuracy(phase.net.classify, cfg.split, split_sets, keep=keep)

    student = nets["student"]
    export_student(
        cfg, accelerator, student, domains, teachers, run_dir / "student", fits["student"]
    )
    params = parameter_counts(student, teachers)
    metrics = build_metrics(cfg, accelerator.num_processes, results, params, fits, teacher_seconds)
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "metrics.json", metrics)
        atomic_write_json(run_dir / SUBMISSION, submission_entries(split_sets, predictions))
        write_report(
            run_dir,
            metrics,
            report_curves(read_curves(run_dir / "logs")),
            extra_sections=[s for s in [published_comparison(metrics)] if s],
        )
    accelerator.wait_for_everyone()
    return metrics


def build_metrics(
    cfg: Config,
    num_processes: int,
    results: dict[str, dict[str, dict[str, float]]],
    params: dict[str, float],
    fits: dict[str, FitResult] | None = None,
    teacher_seconds: float = 0.0,
) -> dict[str, Any]:
    """The metrics.json of the run-directory contract (see README).

    ``results[role][task][metric]`` for roles ``student``, ``teacher`` and ``baseline`` (any may
    be missing except ``student``). Δm and the decathlon score use the teachers of the same run
    as the reference (E_max = 2 × teacher error).
    """
    roles = [r for r in ("student", "teacher", "baseline") if r in results]
    tasks = {d: {role: results[role][d] for role in roles} for d in results["student"]}
    summary: dict[str, Any] = {}
    teacher = results.get("teacher")
    for role in ("student", "baseline"):
        if role not in results:
            continue
        prefix = "" if role == "student" else "baseline_"
        summary[f"{prefix}mean_accuracy"] = mean_metric(results[role], "accuracy")
        if teacher:
            # only tasks measured for both (an unlabelled split has no accuracy)
            pairs = {
                d: (r["accuracy"], teacher[d]["accuracy"])
                for d, r in results[role].items()
                if r.get("accuracy") is not None and teacher.get(d, {}).get("accuracy") is not None
            }
            acc = {d: {"accuracy": a} for d, (a, _) in pairs.items()}
            ref = {d: {"accuracy": t} for d, (_, t) in pairs.items()}
            try:
                summary[f"{prefix}delta_m_vs_teachers"] = delta_m(acc, ref) if pairs else None
            except ValueError:  # a teacher at 0: the relative change is undefined
                summary[f"{prefix}delta_m_vs_teachers"] = None
            summary[f"{prefix}decathlon_score"] = (
                decathlon_score(
                    {d: a for d, (a, _) in pairs.items()}, {d: t for d, (_, t) in pairs.items()}
                )[0]
                if pairs
                else None
            )
    for role in roles:  # the official score, for runs on the real Visual Decathlon domains
        official = official_decathlon_score({d: r["accuracy"] for d, r in results[role].items()})
        if official is not None:
            summary.setdefault("official_decathlon_score", {})[role] = official
    if teacher:
        summary["teacher_mean_accuracy"] = mean_metric(teacher, "accuracy")
    summary["params"] = {k: v for k, v in params.items() if k != "backbone_multiplier"}
    if "backbone_multiplier" in params:
        summary["backbone_multiplier"] = params["backbone_multiplier"]
    summary.update(fit_records(fits or {}, teacher_seconds, "val_accuracy"))
    summary["num_processes"] = num_processes
    return {"preset": cfg.preset, "split": cfg.split, "tasks": tasks, "summary": summary}


def fit_records(
    fits: dict[str, FitResult], teacher_seconds: float, score_key: str
) -> dict[str, Any]:
    """Summary entries of the trained phases: total and per-phase seconds, the val selection."""
    records: dict[str, Any] = {
        "train_seconds": teacher_seconds + sum(f.seconds for f in fits.values())
    }
    if fits:
        records["phase_seconds"] = {role: f.seconds for role, f in fits.items()}
        records["selection"] = {
            role: {"split": "val", "best_step": f.best_step, score_key: f.best_val}
            for role, f in fits.items()
        }
    return records


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


def parameter_counts(student: MultiDomainNet, teachers: dict[str, Teacher]) -> dict[str, int]:
    """Exported student (no adapters), its alignment adapters, and all teachers together."""
    exported = count_parameters(student, exclude_prefix="adapters.")
    counts: dict[str, float] = {
        "student": exported,
        "adapters": count_parameters(student) - exported,
        "teachers_total": sum(count_parameters(t.net) for t in teachers.values()),
    }
    if teachers:  # the "#par" column of the Decathlon tables: student backbone / one backbone
        one = count_parameters(next(iter(teachers.values())).net.backbone)
        counts["backbone_multiplier"] = count_parameters(student.backbone) / one
    return counts


def evaluate_teachers(
    evaluator: Evaluator, teachers: dict[str, Teacher], split: str, sets: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """Each teacher on its own domain's ``split``."""
    results = {}
    for d, t in teachers.items():
        results[d] = evaluator.accuracy(t.net.classify, split, {d: sets[d]})[d]
    return results


def submission_entries(
    sets: dict[str, Any], predictions: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> list[dict[str, int]]:
    """The Visual Decathlon submission: ``[{"image_id", "category_id"}]`` over all domains.

    Ids are the annotation files' own (official global ids for the real benchmark); entries are
    sorted by image id. Predictions were gathered over all processes, without padding duplicates.
    """
    entries = []
    for domain, (preds, _, ids) in predictions.items():
        dataset = sets[domain]
        entries += [
            {"image_id": int(i), "category_id": dataset.category_id(int(p))}
            for p, i in zip(preds.tolist(), ids.tolist(), strict=True)
        ]
    return sorted(entries, key=lambda e: e["image_id"])


def evaluate_student(
    cfg: Config, accelerator: Accelerator, domains: DomainSet, run_dir: Path, student_dir: Path
) -> dict[str, Any]:
    """Evaluate an exported student on ``cfg.split`` (with the teachers it names, when found)."""
    net, manifest = load_student(student_dir)
    net.to(accelerator.device)
    missing = [d for d in manifest["tasks"] if d not in domains.domains]
    if missing:
        raise ConfigError(
            f"student {str(student_dir)!r} has heads for {missing}, not found in the data "
            f"({', '.join(domains.domains)})"
        )
    sets = {d: domains.dataset(d, cfg.split) for d in manifest["tasks"]}
    for d, ds in sets.items():
        if ds.num_classes != manifest["tasks"][d]["num_classes"]:
            raise ConfigError(
                f"student {str(student_dir)!r} has {manifest['tasks'][d]['num_classes']} classes "
                f"for {d!r}, the data has {ds.num_classes}"
            )
    evaluator = Evaluator(accelerator, cfg.data.eval_batch_size, cfg.data.num_workers)
    predictions: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    results: dict[str, Any] = {
        "student": evaluator.accuracy(net.classify, cfg.split, sets, keep=predictions)
    }
    teachers = teachers_of_student(
        accelerator,
        manifest,
        lambda: {d: t for d, t in load_teachers(cfg, domains).items() if d in sets},
    )
    if teachers:
        for t in teachers.values():
            t.net.to(accelerator.device)
        results["teacher"] = evaluate_teachers(evaluator, teachers, cfg.split, sets)
    metrics = build_metrics(
        cfg, accelerator.num_processes, results, parameter_counts(net, teachers)
    )
    metrics["student"] = str(student_dir)
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "metrics.json", metrics)
        atomic_write_json(run_dir / SUBMISSION, submission_entries(sets, predictions))
    accelerator.wait_for_everyone()
    return metrics


def teachers_of_student(
    accelerator: Accelerator, manifest: dict[str, Any], load: Callable[[], dict[str, T]]
) -> dict[str, T]:
    """The teachers ``load`` finds, if they are the ones the exported student records; else {}.

    Any teacher missing or not verifying, or a weights hash other than the student manifest's,
    leaves the teachers out (saying why): an exported student is evaluated without them.
    """
    try:
        teachers = load()
    except (FileNotFoundError, ValueError) as err:
        accelerator.print(f"teachers not evaluated: {err}")
        return {}
    recorded = {d: t["weights_sha256"] for d, t in manifest.get("teachers", {}).items()}
    if not all(recorded.get(d) == t.manifest["weights_sha256"] for d, t in teachers.items()):
        accelerator.print(
            "teachers not evaluated: they are not the ones this student was distilled from"
        )
        return {}
    return teachers


# --------------------------------------------------------------------------------------------
# Export: the student without its alignment adapters


def teacher_records(teachers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The student manifest's record of each teacher: its weights hash and validation metrics."""
    return {
        d: {
            "weights_sha256": t.manifest["weights_sha256"],
            "val_metrics": t.manifest["val_metrics"],
        }
        for d, t in teachers.items()
    }


def export_student(
    cfg: Config,
    accelerator: Accelerator,
    net: MultiDomainNet,
    domains: DomainSet,
    teachers: dict[str, Teacher],
    directory: Path,
    result: FitResult,
) -> None:
    """Write ``student/model.safetensors`` and ``student/manifest.json`` (main process)."""
    if accelerator.is_main_process:
        digest = save_weights(directory / "model.safetensors", net.head_and_backbone_state())
        sets = {d: domains.dataset(d, "train") for d in domains.domains}
        manifest = {
            "format": "unirep-student/1",
            "unirep_version": __version__,
            "preset": cfg.preset,
            "architecture": {
                **architecture(cfg),
                "residual_adapters": cfg.model.residual_adapters,
            },
            "feature_dim": net.feature_dim,
            "tasks": {
                d: {
                    "type": "classification",
                    "num_classes": sets[d].num_classes,
                    "class_names": sets[d].class_names,
                    "preprocessing": domains.preprocessing(d),
                }
                for d in domains.domains
            },
            "teachers": teacher_records(teachers),
            "selection": {
                "split": "val",
                "best_step": result.best_step,
                "val_accuracy": result.best_val,
            },
            "weights_sha256": digest,
        }
        atomic_write_json(directory / STUDENT_MANIFEST, manifest)
    accelerator.wait_for_everyone()


def read_student(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An exported student's manifest and weights, the weights checked against its hash."""
    directory = Path(directory)
    manifest = read_json(directory / STUDENT_MANIFEST, what="student manifest")
    weights = directory / "model.safetensors"
    if file_sha256(weights) != manifest.get("weights_sha256"):
        raise ValueError(f"student weights {str(weights)!r} do not match the hash in its manifest")
    return manifest, load_weights(weights)


def load_student(directory: Path) -> tuple[MultiDomainNet, dict[str, Any]]:
    """Rebuild an exported student (strict load, hash checked); returns (net, manifest)."""
    manifest, state = read_student(directory)
    arch = manifest["architecture"]
    net = build_network(
        arch["backbone"],
        arch.get("backbone_kwargs", {}),
        {d: t["num_classes"] for d, t in manifest["tasks"].items()},
        residual_adapters=arch.get("residual_adapters", False),
    )
    net.load_state_dict(state, strict=True)
    net.eval()
    return net, manifest
