"""Stage one: one single-task teacher per task (a Visual Decathlon domain, or a dense task).

Each teacher is the run's architecture with one task, trained with that task's supervised loss
on the training split, selected on the validation split by the task's main metric (accuracy,
mIoU ↑, depth abs err ↓, normal mean angle ↓), and saved with its manifest under
``<teacher_root>/<task>-<key>/``, the key hashing everything that determines it
(:func:`unirep.stage_one.keys.teacher_key`). With ``classification.finetune_from`` (Visual
Decathlon: ImageNet) that task's teacher is trained first from scratch and its trunk initialises
the others, which then follow ``classification.finetune_train`` (Rebuffi et al. 2017; Li, Liu &
Bilen 2023). This is URL's recipe, except that the reference selects its dense teachers on the test
split.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed
from unirep.stage_one.keys import finetune_source, teacher_key, teacher_path, teacher_recipe

import unirep.layout as layout
from unirep.config.schema import Config
from unirep.data.streams import RunData
from unirep.errors import ConfigError
from unirep.io import clean_partial
from unirep.models.build import architecture, build_network
from unirep.objective import Objective
from unirep.tasks import Task
from unirep.teachers.store import MANIFEST, load_teacher, save_teacher
from unirep.training.evaluator import Evaluator, mean_main_metric_score
from unirep.training.trainable import TrainableModule
from unirep.training.trainer import Phase, fit
from unirep.weighting import build_weighting


def _order(cfg: Config, tasks: list[str]) -> list[str]:
    source = finetune_source(cfg)
    if source is None:
        return list(tasks)
    if source not in tasks:
        raise ConfigError(
            f"config key 'classification.finetune_from': {source!r} is not a task of this run "
            f"({', '.join(tasks)})"
        )
    return [source] + [t for t in tasks if t != source]


def _load(cfg: Config, data: RunData, task: Task, world_size: int) -> object:
    return load_teacher(
        teacher_path(cfg, data, task.name, world_size),
        task,
        architecture=architecture(cfg),
        data_fingerprint=data.fingerprint(task.name),
        key=teacher_key(cfg, data, task.name, world_size),
    )


def train_teacher(
    cfg: Config,
    accelerator: Accelerator,
    data: RunData,
    task: Task,
    run_dir: Path,
    evaluator: Evaluator,
    init_from: Task | None = None,
) -> float:
    """Train and save one task's teacher; returns the training seconds."""
    set_seed(cfg.seed)
    tasks = {task.name: task}
    recipe = teacher_recipe(cfg, task.name)
    net = build_network(architecture(cfg), tasks)
    if init_from is not None:
        source = _load(cfg, data, init_from, accelerator.num_processes)
        net.trunk.load_state_dict(source.net.trunk.state_dict(), strict=True)  # type: ignore[attr-defined]
    name = f"teacher-{task.name}"
    stream = task.stream
    phase = Phase(
        name=name,
        module=TrainableModule(net, Objective(tasks), build_weighting("sum", [task.name])),
        tasks=tasks,
        train_sets={stream: data.labelled_train_set(task.name)},  # partial labels: its own
        val_sets={stream: data.datasets("val")[stream]},
        batch_sizes={stream: data.batch_sizes()[stream]},
        cfg=recipe,
        checkpoint_dir=layout.checkpoint_dir(run_dir, name),
        log_dir=run_dir / layout.LOGS,
        score=mean_main_metric_score(tasks),
        score_name=task.main_metric if task.higher_is_better else f"neg_{task.main_metric}",
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
    )
    result = fit(accelerator, phase, evaluator, progress=cfg.progress)
    val_metrics = evaluator.evaluate(net, "val", phase.val_sets, tasks)[task.name]
    if accelerator.is_main_process:
        train_set = phase.train_sets[stream]
        save_teacher(
            teacher_path(cfg, data, task.name, accelerator.num_processes),
            net,
            task,
            architecture=architecture(cfg),
            preprocessing=data.preprocessing(stream),
            data={
                "root": str(data.root),
                "split": "train",
                "selection_split": "val",
                "num_samples": len(train_set),  # type: ignore[arg-type]
                "fingerprint": data.fingerprint(task.name),
            },
            val_metrics=val_metrics,
            training={
                "steps": recipe.max_steps,
                "best_step": result.best_step,
                "seed": cfg.seed,
                "finetuned_from": init_from.name if init_from else None,
                "seconds": result.seconds,
                "selection_metric": task.main_metric,
            },
            key=teacher_key(cfg, data, task.name, accelerator.num_processes),
        )
    accelerator.wait_for_everyone()
    return result.seconds


def ensure_teachers(
    cfg: Config,
    accelerator: Accelerator,
    data: RunData,
    run_dir: Path,
    only: list[str] | None = None,
) -> float:
    """Train every missing teacher (or those of ``only``), verifying the existing ones; returns
    the seconds spent.

    An existing teacher is reused only if it verifies; a mismatch is an error naming the file,
    never a silent retrain. A fine-tuned teacher needs its source in the cache already.
    """
    evaluator = Evaluator(accelerator, cfg.data.eval_batch_size, cfg.data.num_workers)
    tasks = data.tasks()
    if accelerator.is_main_process:
        data.save_records(run_dir)  # e.g. the partial-label split, before anything trains on it
    accelerator.wait_for_everyone()
    seconds = 0.0
    for name in _order(cfg, list(tasks)):
        if only is not None and name not in only:
            continue
        directory = teacher_path(cfg, data, name, accelerator.num_processes)
        if not cfg.teachers.retrain and (directory / MANIFEST).exists():
            _load(cfg, data, tasks[name], accelerator.num_processes)
            accelerator.print(f"[teacher-{name}] found {directory}")
            continue
        if accelerator.is_main_process and directory.is_dir():
            clean_partial(directory)  # what a killed save left behind is never read
        source = finetune_source(cfg)
        init_from = tasks[source] if source and source != name else None
        seconds += train_teacher(cfg, accelerator, data, tasks[name], run_dir, evaluator, init_from)
        accelerator.print(f"[teacher-{name}] saved {directory}")
    return seconds
