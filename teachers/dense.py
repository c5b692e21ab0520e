"""Teachers for dense multi-task prediction: one single-task network per task.

Each teacher is the run's dense architecture (same encoder, decoder width and head as the student,
without cross-task modules) with one task, trained with that task's loss on the training split,
selected on the validation split by the task's main metric (mIoU ↑, depth abs err ↓, normal mean
angle ↓), and saved with its manifest under ``<teacher_root>/<preset>/<task>/``. This is URL's
NYUv2 recipe (Li, Liu & Bilen, IJCV 2023: three SegNet single-task networks), except that the
reference selects its teachers on the test split.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed

from unirep.config import Config
from unirep.data.dense_sets import DenseData
from unirep.dense_eval import MAIN_METRIC, DenseEvaluator, task_score
from unirep.dense_pipeline import (
    STREAM,
    dense_architecture,
    load_task_teacher,
    make_evaluator,
    sets,
    task_channels,
)
from unirep.metrics import METRIC_HIGHER_IS_BETTER
from unirep.models.dense import build_dense_from_architecture
from unirep.objective import DenseTaskObjective
from unirep.pipeline import teacher_root
from unirep.teachers import MANIFEST, save_dense_teacher, teacher_dir
from unirep.trainer import DenseIO, Phase, fit


def train_dense_teacher(
    cfg: Config,
    accelerator: Accelerator,
    data: DenseData,
    task: str,
    run_dir: Path,
    evaluator: DenseEvaluator,
) -> float:
    """Train and save one task's teacher; returns the training seconds."""
    assert cfg.dense is not None
    set_seed(cfg.seed)
    arch = dense_architecture(cfg)
    net = build_dense_from_architecture(arch, {task: task_channels(data)[task]})
    metric = MAIN_METRIC[task]
    name = f"teacher-{task}"
    phase = Phase(
        name=name,
        net=net,
        objective=DenseTaskObjective({task: cfg.dense.tasks[task]}),
        train_sets=sets(data, "train", train=True),
        val_sets=sets(data, "val"),
        batch_sizes={STREAM: cfg.data.batch_size},
        cfg=cfg.teachers.train,
        checkpoint_dir=run_dir / "checkpoints" / name,
        log_dir=run_dir / "logs",
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        batch_io=DenseIO([task]),
        score=lambda results: task_score(task, results),
        score_name=metric if METRIC_HIGHER_IS_BETTER[metric] else f"neg_{metric}",
    )
    result = fit(accelerator, phase, evaluator, progress=cfg.progress)
    val_metrics = evaluator.evaluate(net, "val", sets(data, "val"))[task]
    if accelerator.is_main_process:
        train_set = data.dataset("train")
        save_dense_teacher(
            teacher_dir(teacher_root(cfg), cfg.preset, task),
            net,
            task,
            architecture=arch,
            preprocessing=data.preprocessing(),
            data={
                "root": str(data.root),
                "split": "train",
                "selection_split": "val",
                "num_samples": len(train_set),  # type: ignore[arg-type]
                "fingerprint": data.fingerprint(),
            },
            val_metrics=val_metrics,
            training={
                "steps": cfg.teachers.train.max_steps,
                "best_step": result.best_step,
                "seed": cfg.seed,
                "seconds": result.seconds,
                "selection_metric": metric,
            },
        )
    accelerator.wait_for_everyone()
    return result.seconds


def ensure_dense_teachers(
    cfg: Config, accelerator: Accelerator, data: DenseData, run_dir: Path
) -> float:
    """Train every missing task teacher (verifying the existing ones); returns the seconds."""
    evaluator = make_evaluator(cfg, accelerator, data)
    seconds = 0.0
    for task in data.tasks:
        directory = teacher_dir(teacher_root(cfg), cfg.preset, task)
        if not cfg.teachers.retrain and (directory / MANIFEST).exists():
            # a mismatch is an error naming the file, never a silent retrain
            load_task_teacher(cfg, data, task)
            accelerator.print(f"[teacher-{task}] found {directory}")
            continue
        seconds += train_dense_teacher(cfg, accelerator, data, task, run_dir, evaluator)
        accelerator.print(f"[teacher-{task}] saved {directory}")
    return seconds


__all__ = ["ensure_dense_teachers", "train_dense_teacher"]
