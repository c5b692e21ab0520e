"""The training loop and evaluation, the same for teachers, the baseline and the distilled student.

``fit`` reads top to bottom: set up (optimizers, schedules, resume) → for each step: draw one batch
per domain, run the frozen teachers, forward / backward / clip / step → log → evaluate on the
validation split and keep the best weights → checkpoint → stop. The loop never branches on a
method: the objective decides what the loss is; teachers are given only when it needs them.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from unirep.config import TrainConfig
from unirep.data.sampling import MultiDomainStream
from unirep.io import atomic_write_json, load_weights, read_json, save_weights
from unirep.metrics import AccuracyMeter
from unirep.objective import TaskObjective
from unirep.optim import build_optimizer, build_scheduler
from unirep.tracking import CSVLog

DONE = "done.json"
BEST = "best.safetensors"
#: Parameter-name prefixes of the alignment adapters (classification ``adapters.<domain>``, dense
#: ``align_bottleneck.<task>`` / ``align_features.<task>``): trained by ``train.adapter_optim``.
ADAPTER_PREFIXES: tuple[str, ...] = ("adapters.", "align_bottleneck.", "align_features.")


class ClassificationIO:
    """How a multi-domain classification batch feeds the network and its teachers.

    A batch is ``{domain: {"image": [B, 3, H, W], "label": [B], ...}}``; the network takes
    ``{domain: images}`` and each teacher its own domain's images.
    """

    def split(
        self, batch: dict[str, dict[str, Tensor]], device: torch.device
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(inputs for the network, targets for the objective), on ``device``."""
        images = {d: b["image"].to(device, non_blocking=True) for d, b in batch.items()}
        labels = {d: b["label"].to(device, non_blocking=True) for d, b in batch.items()}
        return images, labels

    def teacher_outputs(self, teachers: dict[str, nn.Module], inputs: dict[str, Tensor]) -> Any:
        """``{domain: teacher output}``: each teacher sees its own domain's batch."""
        return {d: teachers[d]({d: x})[d] for d, x in inputs.items()}


class DenseIO:
    """How a dense multi-task batch feeds the network and the per-task teachers.

    A batch is ``{stream: {"image": [B, 3, H, W], "semantic": [B, H, W], "depth": [B, 1, H, W],
    "normal": [B, 3, H, W], "index": [B]}}`` with a single stream; the network and every
    teacher see the same images.
    """

    def __init__(self, tasks: list[str]) -> None:
        self.tasks = list(tasks)

    def split(
        self, batch: dict[str, dict[str, Tensor]], device: torch.device
    ) -> tuple[Tensor, dict[str, Tensor]]:
        (sample,) = batch.values()
        images = sample["image"].to(device, non_blocking=True)
        targets = {t: sample[t].to(device, non_blocking=True) for t in self.tasks}
        return images, targets

    def teacher_outputs(self, teachers: dict[str, nn.Module], inputs: Tensor) -> Any:
        """``{task: {"pred", "features", "bottleneck"}}`` of each single-task teacher."""
        return {t: net(inputs)[t] for t, net in teachers.items()}


@dataclass
class Phase:
    """One network to train: its data, objective, teachers and where its state goes."""

    name: str  # "teacher/<domain>", "baseline", "student"
    net: nn.Module
    objective: TaskObjective
    train_sets: dict[str, Dataset]
    val_sets: dict[str, Dataset]
    batch_sizes: dict[str, int]
    cfg: TrainConfig
    checkpoint_dir: Path
    log_dir: Path
    seed: int = 0
    teachers: dict[str, Any] = field(default_factory=dict)  # objects with a frozen ``.net``
    resume_from: Path | None = None  # a specific checkpoint; else the latest one, if any
    num_workers: int = 0
    batch_io: ClassificationIO | DenseIO = field(default_factory=ClassificationIO)
    # validation results -> selection score (higher is better); None: mean of selection_metric
    score: Callable[[dict[str, dict[str, Any]]], float] | None = None
    score_name: str | None = None  # logged as val/<score_name>; None: train.selection_metric


@dataclass
class FitResult:
    """What a phase produced: the best validation score, when it was reached, and the time."""

    best_val: float
    best_step: int
    seconds: float
    steps: int


# --------------------------------------------------------------------------------------------
# Evaluation


class Evaluator:
    """Prepared, sharded loaders per (split, domain); accuracy gathered over all processes.

    Loaders are prepared once per (split, domain) and reused by every phase of a run: the
    evaluation datasets of one run are the same files with the same deterministic transform.
    """

    def __init__(self, accelerator: Accelerator, batch_size: int, num_workers: int = 0) -> None:
        self.accelerator = accelerator
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._loaders: dict[tuple[str, str], Any] = {}

    def loader(self, split: str, domain: str, dataset: Dataset) -> Any:
        key = (split, domain)
        if key not in self._loaders:
            loader = DataLoader(dataset, self.batch_size, num_workers=self.num_workers)
            self._loaders[key] = self.accelerator.prepare_data_loader(loader)
        return self._loaders[key]

    @torch.no_grad()
    def predict(
        self, classify: Callable[[Tensor, str], Tensor], split: str, domain: str, dataset: Dataset
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(predictions, labels, image ids) over the whole split, in every process."""
        preds, labels, ids = [], [], []
        for batch in self.loader(split, domain, dataset):
            with self.accelerator.autocast():
                logits = classify(batch["image"], domain)
            p, y, i = self.accelerator.gather_for_metrics(
                (logits.argmax(1), batch["label"], batch["image_id"])
            )
            preds.append(p.cpu())
            labels.append(y.cpu())
            ids.append(i.cpu())
        return torch.cat(preds), torch.cat(labels), torch.cat(ids)

    def accuracy(
        self,
        classify: Callable[[Tensor, str], Tensor],
        split: str,
        datasets: dict[str, Dataset],
        keep: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None,
    ) -> dict[str, dict[str, float | None]]:
        """``{domain: {"accuracy": fraction}}``, ``None`` for an unlabelled split (stripped test).

        With ``keep``, each domain's (predictions, labels, image ids) are stored in it.
        """
        results: dict[str, dict[str, float | None]] = {}
        for domain, dataset in datasets.items():
            preds, labels, ids = self.predict(classify, split, domain, dataset)
            if keep is not None:
                keep[domain] = (preds, labels, ids)
            meter = AccuracyMeter()
            meter.update(preds, labels)
            results[domain] = {"accuracy": meter.compute() if meter.count else None}
        return results

    def evaluate(
        self, net: nn.Module, split: str, datasets: dict[str, Dataset]
    ) -> dict[str, dict[str, float | None]]:
        """The trainer's entry point: :meth:`accuracy` of ``net.classify``."""
        return self.accuracy(net.classify, split, datasets)


def mean_metric(results: dict[str, dict[str, float | None]], metric: str) -> float | None:
    """Mean of ``metric`` over the tasks that have it (None where no task was measured)."""
    values = [r[metric] for r in results.values() if r.get(metric) is not None]
    return float(np.mean(values)) if values else None


# --------------------------------------------------------------------------------------------
# Checkpoints: checkpoints/<phase>/step_NNNNNN/, written to a temporary folder then renamed


def latest_checkpoint(directory: Path) -> Path | None:
    steps = sorted(Path(directory).glob("step_*/trainer_state.json"))
    return steps[-1].parent if steps else None


def _save_checkpoint(
    accelerator: Accelerator,
    directory: Path,
    step: int,
    net: torch.nn.Module,
    optimizers: list[Any],
    schedulers: list[Any],
    state: dict[str, Any],
    keep: int,
) -> None:
    final = Path(directory) / f"step_{step:06d}"
    tmp = Path(directory) / f".step_{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(rng, tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_weights(tmp / "model.safetensors", accelerator.unwrap_model(net).state_dict())
        torch.save(
            {
                "optimizers": [o.state_dict() for o in optimizers],
                "schedulers": [s.state_dict() for s in schedulers],
            },
            tmp / "optim.pt",
        )
        atomic_write_json(tmp / "trainer_state.json", {**state, "step": step})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(Path(directory).glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(
    accelerator: Accelerator,
    path: Path,
    net: torch.nn.Module,
    optimizers: list[Any],
    schedulers: list[Any],
) -> dict[str, Any]:
    state = read_json(path / "trainer_state.json", what="trainer state")
    accelerator.unwrap_model(net).load_state_dict(load_weights(path / "model.safetensors"))
    optim = torch.load(path / "optim.pt", map_location="cpu", weights_only=False)
    for o, s in zip(optimizers, optim["optimizers"], strict=True):
        o.load_state_dict(s)
    for sch, s in zip(schedulers, optim["schedulers"], strict=True):
        sch.load_state_dict(s)
    return state


def _restore_rng(accelerator: Accelerator, path: Path) -> None:
    """This process's RNG states at the checkpoint (data augmentation continues identically)."""
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    if not rng_file.exists():
        accelerator.print(f"{rng_file} is missing: augmentation randomness will differ")
        return
    rng = torch.load(rng_file, map_location="cpu", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# --------------------------------------------------------------------------------------------
# The loop


def fit(
    accelerator: Accelerator,
    phase: Phase,
    evaluator: Any,
    progress: bool = True,
) -> FitResult:
    """Train ``phase.net`` in place and leave it holding its best validation weights.

    ``evaluator`` has ``evaluate(net, split, datasets) -> {task: {metric: value}}``
    (:class:`Evaluator`, or :class:`unirep.dense_eval.DenseEvaluator` for dense runs).
    """
    cfg, ckpt_dir = phase.cfg, Path(phase.checkpoint_dir)
    unwrapped = phase.net

    # A finished phase (resume after a later interruption) only reloads its best weights.
    if (ckpt_dir / DONE).exists():
        done = read_json(ckpt_dir / DONE, what="phase record")
        unwrapped.load_state_dict(load_weights(ckpt_dir / BEST))
        accelerator.print(f"[{phase.name}] already trained; best val {done['best_val']:.4f}")
        return FitResult(done["best_val"], done["best_step"], done["seconds"], done["steps"])

    # Setup: shared weights and heads get the main optimizer; alignment adapters their own.
    adapter_params = [p for n, p in unwrapped.named_parameters() if n.startswith(ADAPTER_PREFIXES)]
    main_params = [p for n, p in unwrapped.named_parameters() if not n.startswith(ADAPTER_PREFIXES)]
    optimizers = [
        build_optimizer(cfg.optim.optimizer.name, main_params, cfg.optim.optimizer.kwargs)
    ]
    schedulers = [
        build_scheduler(
            cfg.optim.scheduler.name, optimizers[0], cfg.max_steps, cfg.optim.scheduler.kwargs
        )
    ]
    if adapter_params:
        spec = cfg.adapter_optim
        optimizers.append(
            build_optimizer(spec.optimizer.name, adapter_params, spec.optimizer.kwargs)
        )
        schedulers.append(
            build_scheduler(
                spec.scheduler.name, optimizers[1], cfg.max_steps, spec.scheduler.kwargs
            )
        )
    accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps
    net, *optimizers = accelerator.prepare(unwrapped, *optimizers)
    teachers = {d: t.net.to(accelerator.device) for d, t in phase.teachers.items()}

    # Resume: weights, optimizer and schedule state, RNG; the data position follows from the step.
    start, best_val, best_step, seconds = 0, -math.inf, -1, 0.0
    resume_path = phase.resume_from or latest_checkpoint(ckpt_dir)
    if resume_path is not None:
        state = _load_checkpoint(accelerator, resume_path, net, optimizers, schedulers)
        start, best_val, best_step = state["step"], state["best_val"], state["best_step"]
        seconds = state["seconds"]
        accelerator.print(f"[{phase.name}] resumed from {resume_path} at step {start}")
    accum = cfg.gradient_accumulation_steps
    stream = MultiDomainStream(
        phase.train_sets,
        phase.batch_sizes,
        seed=phase.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        start_step=start * accum,
        num_workers=phase.num_workers,
    )
    if resume_path is not None:  # after the loaders, whose creation draws from the RNG
        _restore_rng(accelerator, resume_path)
    log = CSVLog(phase.log_dir, phase.name, accelerator.is_main_process, resume_step=start)
    bar = tqdm(
        total=cfg.max_steps,
        initial=start,
        desc=phase.name,
        disable=not (progress and accelerator.is_main_process),
        dynamic_ncols=True,
    )
    needs_teachers = phase.objective.needs_teachers
    t0 = time.perf_counter()
    running: dict[str, float] = {}
    net.train()

    for step in range(start, cfg.max_steps):
        # Forward / backward over `accum` micro-batches, one batch per domain each.
        for _ in range(accum):
            inputs, targets = phase.batch_io.split(next(stream), accelerator.device)
            teacher_out = None
            if needs_teachers:
                with torch.no_grad(), accelerator.autocast():
                    teacher_out = phase.batch_io.teacher_outputs(teachers, inputs)
            with accelerator.accumulate(net):
                outputs = net(inputs)
                terms = phase.objective(outputs, targets, teacher_out, step, cfg.max_steps)
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients and cfg.grad_clip:
                    accelerator.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                for opt in optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            for k, v in terms.items():
                running[k] = running.get(k, 0.0) + float(v.detach()) / accum
        for sch in schedulers:
            sch.step()
        done_steps = step + 1

        # Log: means over the last `log_every` steps, averaged over processes.
        if done_steps % cfg.log_every == 0 or done_steps == cfg.max_steps:
            n = cfg.log_every if done_steps % cfg.log_every == 0 else done_steps % cfg.log_every
            keys = sorted(running)
            mean = accelerator.reduce(
                torch.tensor([running[k] / n for k in keys], device=accelerator.device), "mean"
            )
            values = {f"train/{k}": float(v) for k, v in zip(keys, mean, strict=True)}
            values["train/lr"] = schedulers[0].get_last_lr()[0]
            log.log(done_steps, values)
            bar.set_postfix(loss=f"{values['train/loss']:.3f}")
            running = {}

        # Evaluate on the validation split; keep the best weights (never chosen on test).
        if done_steps % cfg.eval_every == 0 or done_steps == cfg.max_steps:
            net.eval()
            val = evaluator.evaluate(accelerator.unwrap_model(net), "val", phase.val_sets)
            net.train()
            if phase.score is not None:
                score = phase.score(val)
            else:
                score = mean_metric(val, cfg.selection_metric)
            log.log(done_steps, {f"val/{phase.score_name or cfg.selection_metric}": score})
            if score > best_val:
                best_val, best_step = score, done_steps
                if accelerator.is_main_process:
                    save_weights(ckpt_dir / BEST, accelerator.unwrap_model(net).state_dict())
            accelerator.wait_for_everyone()

        # Checkpoint for resume (latest `keep_checkpoints`).
        if done_steps % cfg.checkpoint_every == 0 and done_steps < cfg.max_steps:
            elapsed = seconds + time.perf_counter() - t0
            _save_checkpoint(
                accelerator,
                ckpt_dir,
                done_steps,
                net,
                optimizers,
                schedulers,
                {"best_val": best_val, "best_step": best_step, "seconds": elapsed},
                cfg.keep_checkpoints,
            )
        bar.update(1)

    # Stop: reload the best weights, record the phase as finished.
    bar.close()
    seconds += time.perf_counter() - t0
    accelerator.wait_for_everyone()
    unwrapped.load_state_dict(load_weights(ckpt_dir / BEST))
    if accelerator.is_main_process:
        atomic_write_json(
            ckpt_dir / DONE,
            {
                "best_val": best_val,
                "best_step": best_step,
                "seconds": seconds,
                "steps": cfg.max_steps,
            },
        )
    accelerator.wait_for_everyone()
    net.eval()
    return FitResult(best_val, best_step, seconds, cfg.max_steps)
