"""The training loop, the same for teachers, the baseline and the distilled student.

:func:`fit` reads top to bottom: set up (optimizers, prepare, resume) → for each step one
:func:`train_step` → log → evaluate on the validation split and keep the best weights →
checkpoint → stop. :func:`train_step` is the whole update (draw a batch per stream, run the
frozen teachers, forward, the weighting's backward, clip, step); ``scripts/benchmark.py`` times
this same function. The loop never branches on a method: the objective says what the losses are,
the weighting how they become gradients.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from unirep.batch import Batch, make_batch, mix_batch
from unirep.config.schema import TrainConfig
from unirep.data.sampling import MultiDomainStream
from unirep.errors import NonFiniteError, UnirepError
from unirep.faults import failpoint
from unirep.io import load_weights, read_sealed_json, save_weights, write_sealed_json
from unirep.layout import BEST, DONE
from unirep.optim.optimizers import build_optimizer, build_scheduler
from unirep.tasks import Task
from unirep.training.checkpoint import (
    RETRAIN,
    check_best,
    intact_checkpoint,
    load_checkpoint,
    load_fitting,
    restore_rng,
    save_checkpoint,
)
from unirep.training.tracking import CSVLog, TrackerLog
from unirep.training.trainable import TrainableModule

if TYPE_CHECKING:
    from unirep.teachers.provider import TeacherOutputs


@dataclass
class Phase:
    """One trainable module to train: its data, teachers and where its state goes."""

    name: str  # "teacher-<task>", "baseline", "student"
    module: TrainableModule
    tasks: dict[str, Task]
    train_sets: dict[str, Dataset]  # {stream: dataset}
    val_sets: dict[str, Dataset]
    batch_sizes: dict[str, int]
    cfg: TrainConfig
    checkpoint_dir: Path
    log_dir: Path
    score: Callable[[dict[str, dict[str, Any]]], float]  # validation results -> higher is better
    score_name: str  # logged as val/<score_name>
    seed: int = 0
    # the frozen teachers' outputs (online, batched or cached: unirep.teachers.provider); None:
    # the phase distils nothing
    teachers: TeacherOutputs | None = None
    resume_from: Path | None = None  # a specific checkpoint; else the latest one, if any
    num_workers: int = 0
    # teachers.output_cache.draws: the training sets hold this many pre-drawn augmentations per
    # sample, one drawn per step (the batch carries the teachers' outputs on it); 0: none
    draws: int = 0


@dataclass
class FitResult:
    """What a phase produced: the best validation score, when it was reached, and the time."""

    best_val: float
    best_step: int
    seconds: float
    steps: int
    skipped_steps: int = 0  # steps skipped for a non-finite value (train.on_nonfinite=skip)


@dataclass
class StepContext:
    """Everything :func:`train_step` needs, prepared once per phase by :func:`setup`."""

    accelerator: Any
    module: Any  # the prepared (possibly DDP-wrapped) TrainableModule
    optimizers: list[Any]
    schedulers: list[Any]
    stream: MultiDomainStream
    tasks: dict[str, Task]
    teachers: TeacherOutputs | None
    cfg: TrainConfig
    phase: str = "phase"
    groups: dict[str, list[nn.Parameter]] = field(default_factory=dict)  # named for NaN reports
    skipped: int = 0  # steps skipped for a non-finite value so far
    seed: int = 0  # the phase's seed (mixup's draws)

    @property
    def unwrapped(self) -> TrainableModule:
        return self.accelerator.unwrap_model(self.module)


def _channels_last(batch: Batch) -> Batch:
    """The batch's images in ``torch.channels_last`` (NHWC) memory format, like the weights."""
    batch.inputs = {
        s: x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        for s, x in batch.inputs.items()
    }
    return batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(
    ctx: StepContext, step: int, timings: dict[str, float] | None = None
) -> dict[str, Tensor]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches (or, for a weighting
    that updates task groups one after the other, one step per group on the same batch).

    Returns the micro-batch mean of every logged term (``loss``, ``task/<t>``, ``weight/<t>``, ...)
    as detached 0-dim tensors on the device: nothing here waits for the device, the loop converts
    them once per log interval. With ``timings``, adds the seconds spent on data, teachers and
    the update to it.
    """
    acc, cfg = ctx.accelerator, ctx.cfg
    accum = cfg.gradient_accumulation_steps
    shared = ctx.unwrapped.shared_parameters()  # once per step, not per micro-batch
    weighting = ctx.unwrapped.weighting
    logs: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    groups = weighting.update_groups()
    # per update: every logged term finite in every micro-batch so far
    finite: list[dict[str, Tensor]] = [{} for _ in groups]
    # float64 sums where the device has it: the same numbers as summing Python floats
    dtype = torch.float32 if acc.device.type == "mps" else torch.float64
    clock = time.perf_counter
    diagnostics = ctx.unwrapped.diagnostics
    measure = diagnostics is not None and diagnostics.due(step)
    for micro in range(accum):
        t0 = clock()
        batch = make_batch(next(ctx.stream), ctx.tasks).to(acc.device)
        if cfg.mixup > 0:  # before the teachers: they see the mixed images
            batch = mix_batch(batch, cfg.mixup, (ctx.seed, step, micro, acc.process_index))
        if cfg.channels_last:
            batch = _channels_last(batch)
        t1 = clock()
        teacher_out, t2 = None, t1  # no teachers run: exactly 0 s
        if ctx.teachers:
            teacher_out = ctx.teachers(batch)
            if timings is not None:
                _sync(acc.device)
            t2 = clock()
        for g, group in enumerate(groups):
            last = micro == accum - 1 and g == len(groups) - 1
            terms = _update(ctx, shared, batch, teacher_out, step, group, g == 0,
                            measure and last, finite[g])  # fmt: skip
            for k, v in terms.items():  # the mean over the micro-batches that logged the term
                v = v.to(dtype)
                logs[k] = logs[k] + v if k in logs else v
                counts[k] = counts.get(k, 0) + 1
        if timings is not None:
            _sync(acc.device)
            t3 = clock()
            for key, dt in (("data", t1 - t0), ("teachers", t2 - t1), ("step", t3 - t2)):
                timings[key] = timings.get(key, 0.0) + dt
    for sch in ctx.schedulers:
        sch.step()
    return {k: v / counts[k] for k, v in logs.items()}


def _update(
    ctx: StepContext,
    shared: list[nn.Parameter],
    batch: Batch,
    teacher_out: Any,
    step: int,
    group: list[str] | None,
    log_bundle: bool,
    measure: bool,
    finite: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Forward, the weighting's backward and, at the end of an accumulation window, the checked
    optimizer step, for the losses of ``group`` (``None``: every task). Returns the logged terms:
    the whole bundle's (``log_bundle``) and the weighting's."""
    acc, cfg = ctx.accelerator, ctx.cfg
    unwrapped = ctx.unwrapped
    weighting, diagnostics = unwrapped.weighting, None
    updated = False
    with acc.accumulate(ctx.module):
        bundle = ctx.module(batch, teacher_out, step, cfg.max_steps, group, log_bundle)
        task_grads = None
        if measure:  # before the weighting frees the graph
            diagnostics = unwrapped.diagnostics
            assert diagnostics is not None
            task_grads = diagnostics.gradients(bundle, shared, acc)
        extra = weighting.backward(bundle, shared, acc)
        logged: dict[str, Any] = {}
        if log_bundle:  # a group's bundle carries the whole loss in its logs
            logged = dict(bundle.logs) if "loss" in bundle.logs else {
                "loss": bundle.total(), **bundle.logs}  # fmt: skip
        terms: dict[str, Tensor] = {
            k: torch.as_tensor(v, device=acc.device).detach()
            for k, v in {**logged, **extra}.items()
        }
        for k, v in terms.items():
            ok = torch.isfinite(v).all()
            finite[k] = finite[k] & ok if k in finite else ok
        if acc.sync_gradients and _update_is_finite(ctx, finite, step):
            if cfg.grad_clip:
                acc.clip_grad_norm_(ctx.module.parameters(), cfg.grad_clip)
            for opt in ctx.optimizers:
                opt.step()
            updated = True
            if task_grads is not None:
                assert diagnostics is not None
                found = diagnostics.measure(task_grads, shared, extra, ctx.optimizers[0])
                terms.update({k: torch.tensor(v, device=acc.device)
                              for k, v in found.items() if k not in terms})  # fmt: skip
        for opt in ctx.optimizers:
            opt.zero_grad(set_to_none=True)
    if updated:  # FAMO: the losses of the same batch after the update
        after: dict[str, Tensor] = {}
        if weighting.wants_losses_after_step:
            with torch.no_grad():
                after = ctx.module(batch, teacher_out, step, cfg.max_steps).task_losses()
        weighting.after_step(after, acc)
        unwrapped.after_update(batch, step + 1, cfg.max_steps, acc)  # e.g. DiSparse's masks
    return terms


def _update_is_finite(ctx: StepContext, finite: dict[str, Tensor], step: int) -> bool:
    """Check the step's loss terms and each parameter group's gradient before the update.

    One small all-reduce and one device sync per optimizer step, so every process decides the
    same. A non-finite value stops the phase with :class:`NonFiniteError` naming the term (or the
    parameter group) and the step, before the weights change, so the last checkpoint and the best
    weights stay good; with ``train.on_nonfinite=skip`` the step is skipped (its gradients are
    dropped) and counted. Under fp16 loss scaling, infinite gradients are the scaler's business
    (it skips those steps itself), so only the loss terms are checked.
    """
    acc = ctx.accelerator
    names = [f"loss term {k!r}" for k in finite]
    flags = list(finite.values())
    if getattr(acc, "scaler", None) is None:
        for group, params in ctx.groups.items():
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
                names.append(f"gradient of {group!r}")
                flags.append(torch.isfinite(norm).to(acc.device))
    bad = (~torch.stack(flags)).float()
    if acc.num_processes > 1:
        bad = acc.reduce(bad, "sum")
    found = [n for n, b in zip(names, bad.tolist(), strict=True) if b > 0]
    if not found:
        return True
    where = f"[{ctx.phase}] step {step + 1}"
    # name the specific term first: the total loss is non-finite whenever one term is
    found.sort(key=lambda n: n == "loss term 'loss'")
    if ctx.cfg.on_nonfinite == "skip":
        ctx.skipped += 1
        acc.print(f"{where}: non-finite {', '.join(found)}; step skipped ({ctx.skipped} so far)")
        return False
    raise NonFiniteError(
        f"{where}: non-finite {', '.join(found)}; the run stopped before updating the weights "
        "(its last checkpoint and best weights are intact). Lower the learning rate or the "
        "loss weights, or set train.on_nonfinite=skip to skip such steps"
    )


def setup(accelerator: Any, phase: Phase) -> tuple[StepContext, dict[str, Any]]:
    """Optimizers and schedules (adapters get their own), prepare, resume, the data stream.

    Returns the step context and the trainer's record (``step``, ``best_val``, ``best_step``,
    ``seconds``; zeros for a fresh phase).
    """
    cfg = phase.cfg
    if cfg.channels_last:  # NHWC convolutions (tensor cores on CUDA); train_step converts inputs
        phase.module.to(memory_format=torch.channels_last)
    if (
        cfg.compile
    ):  # compiled on its first call (unirep.pipeline.validate checked torch.compile works)
        phase.module.student.compile()
    main, adapters = phase.module.optimizer_groups()
    specs = [(cfg.optim, main)] + ([(cfg.adapter_optim, adapters)] if adapters else [])
    optimizers, schedulers = [], []
    for spec, params in specs:
        opt = build_optimizer(spec.optimizer.name, params, spec.optimizer.kwargs)
        optimizers.append(opt)
        schedulers.append(
            build_scheduler(spec.scheduler.name, opt, cfg.max_steps, spec.scheduler.kwargs)
        )
    accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps
    module, *optimizers = accelerator.prepare(phase.module, *optimizers)
    memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
    teachers = phase.teachers.prepare(accelerator, memory_format) if phase.teachers else None
    record: dict[str, Any] = {
        "step": 0,
        "best_val": -math.inf,
        "best_step": -1,
        "seconds": 0.0,
        "skipped_steps": 0,
    }
    # every file read back is verified first; a damaged newest checkpoint is skipped, and said
    resume, verified = phase.resume_from, None
    if resume is None:

        def say(line: str) -> None:
            accelerator.print(f"[{phase.name}] {line}")

        resume, verified = intact_checkpoint(phase.checkpoint_dir, say) or (None, None)
    if resume is not None:
        restored = load_checkpoint(accelerator, resume, module, optimizers, schedulers, verified)
        record = {**record, **restored}
        if record["best_val"] is None:  # no finite validation score yet (strict JSON has no -inf)
            record["best_val"] = -math.inf
        accelerator.print(f"[{phase.name}] resumed from {resume} at step {record['step']}")
    stream = MultiDomainStream(
        phase.train_sets,
        phase.batch_sizes,
        seed=phase.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        start_step=record["step"] * cfg.gradient_accumulation_steps,
        num_workers=phase.num_workers,
        draws=phase.draws,
        pin_memory=accelerator.device.type == "cuda",
    )
    if resume is not None:  # after the loaders, whose creation draws from the RNG
        restore_rng(accelerator, resume)
    ctx = StepContext(
        accelerator, module, optimizers, schedulers, stream, phase.tasks, teachers, cfg,
        phase=phase.name, groups=phase.module.named_groups(), skipped=record["skipped_steps"],
        seed=phase.seed,
    )  # fmt: skip
    return ctx, record


def _due(done: int, every: int, last: int) -> bool:
    return done % every == 0 or done == last


def _log_means(
    ctx: StepContext, log: CSVLog, step: int, running: dict[str, Tensor], seen: dict[str, int]
) -> float:
    """Log each term's mean since the last log (``running`` sums over ``seen`` steps), averaged
    over processes, and the learning rate; returns the mean loss."""
    keys = sorted(running)
    values = torch.stack([running[k] / seen[k] for k in keys]).float()
    mean = ctx.accelerator.reduce(values, "mean").tolist()
    logged = {f"train/{k}": float(v) for k, v in zip(keys, mean, strict=True)}
    logged["train/lr"] = ctx.schedulers[0].get_last_lr()[0]
    log.log(step, logged)
    return logged["train/loss"]


def _finished(directory: Path, phase: str) -> dict[str, Any]:
    """A finished phase's record (``done.json``), once it matches the sha256 written with it."""
    try:
        done = read_sealed_json(directory / DONE)
        missing = [f.name for f in dataclasses.fields(FitResult) if f.name not in done]
        if missing or "best_sha256" not in done:
            raise ValueError(f"{DONE} lacks {', '.join(missing or ['best_sha256'])}")
    except ValueError as err:
        raise UnirepError(
            f"[{phase}] the phase record in {directory} is damaged ({err}): "
            + RETRAIN.format(folder=directory)
        ) from None
    return done


def _reload_finished(accelerator: Any, phase: Phase) -> FitResult:
    """A finished phase: its best weights reloaded into the student, once they match the sha256
    its record holds, and its record."""
    ckpt_dir, student = Path(phase.checkpoint_dir), phase.module.student
    done = _finished(ckpt_dir, phase.name)
    best = check_best(ckpt_dir, done["best_sha256"], phase.name)
    load_fitting(student, load_weights(best), f"best weights {best}")
    student.eval()
    accelerator.print(f"[{phase.name}] already trained; best val {done['best_val']:.4f}")
    return FitResult(**{f.name: done[f.name] for f in dataclasses.fields(FitResult)})


def fit(accelerator: Any, phase: Phase, evaluator: Any, progress: bool = True) -> FitResult:
    """Train ``phase.module`` in place; its student is left holding its best validation weights.

    ``evaluator.evaluate(net, split, datasets, tasks) -> {task: {metric: value}}``.
    """
    cfg, ckpt_dir, student = phase.cfg, Path(phase.checkpoint_dir), phase.module.student
    if (ckpt_dir / DONE).exists():  # resume after a later interruption: only reload
        return _reload_finished(accelerator, phase)
    ctx, record = setup(accelerator, phase)
    start, best_val, best_step = record["step"], record["best_val"], record["best_step"]
    best_sha = record.get("best_sha256")  # of best.safetensors as this process last wrote it
    # the CSV log (the report reads it) and the trackers of log_with, as <phase>/<series>
    log = CSVLog(phase.log_dir, phase.name, accelerator.is_main_process, resume_step=start,
                 trackers=TrackerLog(accelerator, phase.name))  # fmt: skip
    show = progress and accelerator.is_main_process
    bar = tqdm(total=cfg.max_steps, initial=start, desc=phase.name, disable=not show)
    t0 = time.perf_counter()
    running: dict[str, Tensor] = {}
    seen: dict[str, int] = {}
    ctx.module.train()
    for step in range(start, cfg.max_steps):
        # Update: one optimizer step (teachers, forward, weighting, clip, step).
        for k, v in train_step(ctx, step).items():  # some terms only on some steps
            running[k] = running[k] + v if k in running else v
            seen[k] = seen.get(k, 0) + 1
        done = step + 1
        failpoint(f"step:{phase.name}:{done}")
        # Log: means since the last log, averaged over processes.
        if _due(done, cfg.log_every, cfg.max_steps):
            bar.set_postfix(loss=f"{_log_means(ctx, log, done, running, seen):.3f}")
            running, seen = {}, {}
        # Evaluate on the validation split; keep the best weights (never chosen on test).
        if _due(done, cfg.eval_every, cfg.max_steps):
            val = evaluator.evaluate(student, "val", phase.val_sets, phase.tasks)
            score = phase.score(val)
            if math.isfinite(score):
                log.log(done, {f"val/{phase.score_name}": score})
            else:  # never selected; the phase fails at its end if no score was ever finite
                accelerator.print(f"[{phase.name}] step {done}: validation score is {score}")
            if math.isfinite(score) and score > best_val:
                best_val, best_step = score, done
                if accelerator.is_main_process:
                    best_sha = save_weights(ckpt_dir / BEST, student.state_dict())
            accelerator.wait_for_everyone()
        # Checkpoint for resume (latest `keep_checkpoints`).
        if done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
            seconds = record["seconds"] + time.perf_counter() - t0
            # a best_val of -inf (nothing selected yet) is written as null (strict JSON)
            state = {"best_val": best_val, "best_step": best_step, "seconds": seconds,
                     "skipped_steps": ctx.skipped, "best_sha256": best_sha}  # fmt: skip
            save_checkpoint(
                accelerator, ckpt_dir, done, ctx.module, ctx.optimizers, ctx.schedulers,
                state, cfg.keep_checkpoints,
            )  # fmt: skip
        bar.update(1)
    bar.close()
    # Stop: reload the best weights, record the phase as finished.
    seconds = record["seconds"] + time.perf_counter() - t0
    accelerator.wait_for_everyone()
    if best_step < 0:
        raise NonFiniteError(
            f"[{phase.name}] no validation score was finite in {cfg.max_steps} steps: "
            "nothing to select (lower the learning rate or the loss weights)"
        )
    if accelerator.num_processes > 1:  # the main process wrote the best weights: its hash
        from accelerate.utils import broadcast_object_list

        best_sha = broadcast_object_list([best_sha])[0]
    best = check_best(ckpt_dir, best_sha, phase.name)
    load_fitting(student, load_weights(best), f"best weights {best}")
    result = FitResult(best_val, best_step, seconds, cfg.max_steps, ctx.skipped)
    if accelerator.is_main_process:
        write_sealed_json(ckpt_dir / DONE, {**vars(result), "best_sha256": best_sha})
    accelerator.wait_for_everyone()
    student.eval()
    return result
