"""Where a training phase spends its time: the real step against a minimal loop, per mode.

For a config (any preset, any ``weighting``) the benchmark builds what a run builds — the run's
data (:func:`~unirep.pipeline.stage_two.resolve_data`), its teachers, and three *modes*: the
baseline (``student_phase(..., distill=False)``: the plain multi-task step), the distilled student
with its teachers run online (``student``), and the student reading the teacher-output cache
(``student+cache``, :mod:`unirep.teachers.output_cache`, with the config's
``teachers.output_cache.draws`` or :data:`CACHE_DRAWS`; the cache is built first when missing) —
and, for each mode, measures two *loops* on the same network and the same batches:

- ``real``: :func:`unirep.training.trainer.setup`, then :func:`unirep.training.trainer.train_step`
  (the function :func:`~unirep.training.trainer.fit` runs) with its ``timings``: seconds per step in
  **data** (draw the batch of every stream, move it to the device), **teachers** (the frozen
  teachers' forward) and **step** (forward, the weighting's backward, clip, optimizer); **other** is
  the rest of the call (schedules). After the steps, one **validation** pass
  (:meth:`~unirep.training.evaluator.Evaluator.evaluate` of the student on the val split) and one
  **checkpoint** write (:func:`~unirep.training.checkpoint.save_checkpoint` into a temporary
  folder).
- ``minimal``: a hand-written torch loop with no accelerate, no weighting, no clipping and no
  schedule: ``bundle = module(batch, teachers' outputs); bundle.total().backward();
  opt.step()`` with the phase's optimizers (teachers under ``no_grad``; ``torch.autocast`` and,
  for fp16, a ``GradScaler`` when ``mixed_precision`` asks for them). Batches come from the same
  step-indexed stream (same samples; random augmentation may draw differently).

``real / minimal`` over teachers + step is the overhead of our machinery (accelerate, the
weighting — e.g. PCGrad's per-task backward passes —, logging); with data it is the whole step.
A phase's projected time splits into step / teachers / data / validation / checkpoint from the
measured means and the config's ``train.max_steps``, ``eval_every`` and ``checkpoint_every``
(the best-weights write after an improved validation is not counted).

Each (mode, loop) runs in a fresh process (``spawn``), so that its peak memory is its own, from
the end of the set-up (models, optimizer state and teachers in place) to the end of the timed
steps (before validation and the checkpoint): CUDA ``max_memory_allocated``, or on CPU the
process's peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; it
includes the interpreter, the libraries and the data already read).

Teachers come from the config's teacher root when they verify, else from a benchmark folder
(:func:`teacher_config`; the caller trains them there, ``scripts/benchmark.py`` with
``unirep.stage_one.train.ensure_teachers`` and the config's teacher recipe, which overrides can
shorten), never into the shared cache. ``random_teachers=True`` uses untrained teachers of the run's
architecture instead: the same cost per step, but not trained weights (say so where quoted).
Run it as one process (``python``, not ``accelerate launch``); the device is the accelerator's
(CUDA when present, ``cpu=true`` forces CPU).

Comparisons of the student's real step under configs that differ in one setting, each
against the first: :func:`term_costs` (each config in a fresh process, one after the other; the
speed options of :data:`OPTION_VARIANTS` are compared this way, on CUDA when present) and
:func:`weighting_costs` (every task-balancing method of :func:`weighting_variants` set up in one
process and alternated step by step, so that a drift of the machine's load falls on all alike;
with the backward passes through the trunk each method needs, :func:`trunk_passes`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing as mp
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext, suppress
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

import unirep.layout as layout
import unirep.training.trainer as trainer
from unirep.batch import make_batch
from unirep.config.load import apply_override, from_dict, to_dict
from unirep.config.schema import Config
from unirep.data.sampling import MultiDomainStream
from unirep.data.streams import RunData
from unirep.errors import ConfigError, TeacherMismatchError
from unirep.models.build import architecture, build_network
from unirep.optim.optimizers import build_optimizer
from unirep.pipeline.overlap import attach_auxiliary_loss, joint_architecture
from unirep.pipeline.rundir import make_accelerator
from unirep.pipeline.stage_two import evaluate_teachers, load_teachers, resolve_data, student_phase
from unirep.pipeline.validate import validate
from unirep.tasks import TASK_KINDS, Task
from unirep.teachers.provider import teacher_outputs
from unirep.teachers.store import Teacher, freeze, teacher_root
from unirep.training.checkpoint import save_checkpoint
from unirep.training.evaluator import Evaluator, Results
from unirep.training.system import minor_page_faults
from unirep.training.trainer import Phase
from unirep.weighting import WEIGHTINGS, GradientWeighting, GradNormWeighting
from unirep.weighting.aggregators import SOLVERS_EXTRA

MODES = {"baseline": False, "student": True, "student+cache": True}  # mode -> distill
CACHED = (
    "student+cache"  # the student reading the teacher-output cache (unirep.teachers.output_cache)
)
CACHE_DRAWS = 4  # K of the cached mode when the config's teachers.output_cache.draws is 0
LOOPS = ("real", "minimal")
SPLITS = ("data", "teachers", "step", "other")  # per training step
BENCH_TEACHERS = "bench-teachers"  # <run_dir>/bench-teachers: teachers trained for a benchmark


# --------------------------------------------------------------------------------------------
# Teachers


def teacher_config(cfg: Config, data: RunData, run_dir: Path) -> tuple[Config, str]:
    """(config whose teacher root holds the teachers to use, where they come from).

    The config's own teachers when every one verifies against the data (and ``teachers.retrain``
    is off); otherwise a copy whose ``teachers.root`` is ``<run_dir>/bench-teachers``, where the
    caller trains the missing ones (``ensure_teachers``), so that short benchmark teachers never
    land in the shared cache.
    """
    if not cfg.teachers.retrain:
        try:
            load_teachers(cfg, data, data.tasks())
            return cfg, f"found in {teacher_root(cfg) / cfg.preset}"
        except (FileNotFoundError, ValueError, TeacherMismatchError):
            pass
    bench = copy.deepcopy(cfg)
    bench.teachers.root = str(Path(run_dir) / BENCH_TEACHERS)
    bench.teachers.retrain = False
    return bench, f"trained for the benchmark in {teacher_root(bench) / cfg.preset}"


def random_teachers(cfg: Config, data: RunData) -> dict[str, Teacher]:
    """Untrained teachers of the run's architecture (same cost as trained ones, not their
    weights): for timing where training the teachers is out of reach."""
    set_seed(cfg.seed)
    return {
        name: Teacher(name, freeze(build_network(architecture(cfg), {name: task})), {})
        for name, task in data.tasks().items()
    }


def _teachers(cfg: Config, data: RunData, untrained: bool) -> dict[str, Teacher]:
    return random_teachers(cfg, data) if untrained else load_teachers(cfg, data, data.tasks())


# --------------------------------------------------------------------------------------------
# Measuring one (mode, loop) in this process


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    """Start the peak at what is allocated (CUDA) or resident (Linux: ``clear_refs``) now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _peak(device: torch.device) -> tuple[float, str]:
    """(peak MiB since :func:`_reset_peak`, what was measured).

    On CPU, Linux's ``VmHWM`` of this process: unlike ``ru_maxrss``, it is not inherited from
    the parent that started the process (``ru_maxrss`` keeps the parent's size at ``fork``).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max_memory_allocated"
    with suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "process peak RSS (VmHWM)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process ru_maxrss"


def _means(per_step: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per step of each split and of the total (means add up: total = Σ splits),
    of ``compute`` (total − data: teachers + step + other), and the medians ``total_median``
    and ``compute_median``."""
    means = {k: statistics.fmean(t.get(k, 0.0) for t in per_step) for k in (*SPLITS, "total")}
    compute = [t["total"] - t.get("data", 0.0) for t in per_step]  # teachers + step + other
    means["compute"] = statistics.fmean(compute)
    means["total_median"] = statistics.median(t["total"] for t in per_step)
    means["compute_median"] = statistics.median(compute)
    if all(
        "page_faults" in t for t in per_step
    ):  # minor faults (the allocator, unirep.training.system)
        means["page_faults"] = statistics.fmean(t["page_faults"] for t in per_step)
    return means


def _timed_step(ctx: Any, step: int, device: torch.device) -> dict[str, float]:
    """One ``trainer.train_step`` with its own split, plus ``other`` (the rest of the call) and
    ``total`` (seconds)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    trainer.train_step(ctx, step, timings)
    _sync(device)
    total = time.perf_counter() - t0
    timings["other"] = total - sum(timings.get(k, 0.0) for k in SPLITS[:3])
    return {**timings, "total": total}


def _bench_phase(phase: Phase, work: Path) -> Phase:
    """The phase with its checkpoints in a fresh folder: never resumes, never touches a run."""
    return dataclasses.replace(phase, checkpoint_dir=layout.checkpoint_dir(work, phase.name),
                               log_dir=work / layout.LOGS, resume_from=None)  # fmt: skip


def _real(accelerator: Any, phase: Phase, steps: int, warmup: int) -> dict[str, Any]:
    """``trainer.setup``, then ``trainer.train_step`` with its timings at every step."""
    device = accelerator.device
    ctx, _ = trainer.setup(accelerator, phase)
    ctx.module.train()
    _reset_peak(device)
    per_step = []
    for step in range(warmup + steps):
        faults = minor_page_faults()
        timings = _timed_step(ctx, step, device)
        if step >= warmup:
            per_step.append({**timings, "page_faults": float(minor_page_faults() - faults)})
    peak, memory = _peak(device)
    return {"per_step": per_step, "peak_mib": peak, "memory": memory, "ctx": ctx}


def _validation_and_checkpoint(
    accelerator: Any, phase: Phase, ctx: Any, evaluator: Evaluator, step: int, work: Path
) -> dict[str, float]:
    """Seconds of one validation pass and of one checkpoint write (and its size)."""
    device = accelerator.device
    _sync(device)
    t0 = time.perf_counter()
    evaluator.evaluate(ctx.unwrapped.student, "val", phase.val_sets, phase.tasks)
    _sync(device)
    validation = time.perf_counter() - t0
    state = {"best_val": None, "best_step": -1, "seconds": 0.0}
    folder = work / "checkpoint-write"
    t0 = time.perf_counter()
    save_checkpoint(
        accelerator, folder, step, ctx.module, ctx.optimizers, ctx.schedulers, state,
        phase.cfg.keep_checkpoints,
    )  # fmt: skip
    checkpoint = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "validation_s": validation,
        "val_images": float(sum(len(d) for d in phase.val_sets.values())),  # type: ignore[arg-type]
        "checkpoint_s": checkpoint,
        "checkpoint_mib": size / 2**20,
    }


def _autocast(cfg: Config, device: torch.device) -> tuple[AbstractContextManager[Any], Any]:
    """(autocast context, GradScaler or None) of ``mixed_precision``, in plain torch."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    if dtype is None:
        return nullcontext(), None
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    return torch.autocast(device.type, dtype=dtype), scaler


def _minimal(
    cfg: Config, device: torch.device, phase: Phase, steps: int, warmup: int
) -> dict[str, Any]:
    """The hand-written loop: plain sum of the losses, ``backward``, ``step``; torch only."""
    module = phase.module.to(device).train()
    teachers = (
        {t: net.to(device) for t, net in phase.teachers.teachers.items()} if phase.teachers else {}
    )
    main, adapters = module.parameter_groups()
    train = phase.cfg
    specs = [(train.optim, main)] + ([(train.adapter_optim, adapters)] if adapters else [])
    optimizers = [build_optimizer(s.optimizer.name, p, s.optimizer.kwargs) for s, p in specs]
    stream = MultiDomainStream(
        phase.train_sets, phase.batch_sizes, seed=phase.seed, num_workers=phase.num_workers,
        draws=phase.draws,
    )  # fmt: skip
    accum = train.gradient_accumulation_steps
    autocast, scaler = _autocast(cfg, device)
    _reset_peak(device)
    per_step = []
    clock = time.perf_counter
    for step in range(warmup + steps):
        split = dict.fromkeys(SPLITS, 0.0)
        for micro in range(accum):  # the same clock points as trainer.train_step
            t0 = clock()
            batch = make_batch(next(stream), phase.tasks).to(device)
            t1 = clock()
            teacher_out = batch.teacher or None  # the teacher-output cache's, when it is on
            t2 = t1  # no teachers run: exactly 0 s
            if teachers and teacher_out is None:
                with torch.no_grad(), autocast:
                    teacher_out = teacher_outputs(teachers, phase.tasks, batch)
                _sync(device)
                t2 = clock()
            with autocast:
                loss = module(batch, teacher_out, step, train.max_steps).total() / accum
            (scaler.scale(loss) if scaler else loss).backward()
            if micro == accum - 1:
                for opt in optimizers:
                    if scaler:
                        scaler.step(opt)
                    else:
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                if scaler:
                    scaler.update()
            _sync(device)
            t3 = clock()
            for key, dt in (("data", t1 - t0), ("teachers", t2 - t1), ("step", t3 - t2)):
                split[key] += dt
        if step >= warmup:
            per_step.append({**split, "total": sum(split.values())})
    peak, memory = _peak(device)
    return {"per_step": per_step, "peak_mib": peak, "memory": memory}


def measure(
    cfg: Config,
    mode: str,
    loop: str,
    steps: int,
    warmup: int,
    teacher_val: Results | None = None,
    untrained_teachers: bool = False,
) -> dict[str, Any]:
    """Time ``loop`` (``real`` or ``minimal``) of ``mode`` (``baseline`` or ``student``) here.

    Builds the accelerator, the data, the teachers (from ``teacher_root(cfg)``, or untrained)
    and the phase exactly as a run does; checkpoints go to a temporary folder.

    Returns:
        ``seconds`` (mean seconds per step of ``data``, ``teachers``, ``step``, ``other``,
        ``total``; ``total_median``), ``steps_per_second``, ``images_per_second``,
        ``images_per_step``, ``peak_mib`` and ``memory``, ``device``, ``threads``; for ``real``
        also ``validation_s``, ``val_images``, ``checkpoint_s``, ``checkpoint_mib``.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0 (got {steps}, {warmup})")
    if mode not in MODES or loop not in LOOPS:
        raise ValueError(f"mode {mode!r}, loop {loop!r}: valid are {list(MODES)} and {LOOPS}")
    if mode != CACHED:
        cfg = copy.deepcopy(cfg)
        cfg.teachers.output_cache.draws = 0  # the teachers online
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    tasks = data.tasks()
    teachers = _teachers(cfg, data, untrained_teachers)
    with tempfile.TemporaryDirectory(prefix="unirep-bench-") as tmp:
        work = Path(tmp)
        role = "baseline" if mode == "baseline" else "student"
        phase_cfg = cached_config(cfg) if mode == CACHED else cfg
        # the pruned auxiliary network's joint step (masks all kept: the same compute) with its
        # auxiliary loss, as unirep.pipeline.overlap trains it
        arch = joint_architecture(architecture(phase_cfg, student=True), data)
        phase, cache = student_phase(
            phase_cfg, accelerator, role, data, tasks, work, teachers, teacher_val, MODES[mode],
            arch=arch,
        )  # fmt: skip
        if role == "student":
            attach_auxiliary_loss(phase, tasks, arch.get("sharing_kwargs", {}).get("union", {}))
        phase = _bench_phase(phase, work)
        accum = phase.cfg.gradient_accumulation_steps
        images = sum(phase.batch_sizes.values()) * accum
        if loop == "real":
            out = _real(accelerator, phase, steps, warmup)
            evaluator = Evaluator(accelerator, cfg.data.eval_batch_size, cfg.data.num_workers)
            out.update(_validation_and_checkpoint(
                accelerator, phase, out.pop("ctx"), evaluator, warmup + steps, work
            ))  # fmt: skip
        else:
            out = _minimal(cfg, accelerator.device, phase, steps, warmup)
    seconds = _means(out.pop("per_step"))
    return {
        "seconds": seconds,
        "cache": cache,
        "steps_per_second": 1.0 / seconds["total"],
        "images_per_step": images,
        "images_per_second": images / seconds["total"],
        "device": str(accelerator.device),
        "threads": torch.get_num_threads(),
        **out,
    }


# --------------------------------------------------------------------------------------------
# The whole benchmark


def _child(queue: Any, args: tuple[Any, ...]) -> None:
    try:
        queue.put(("ok", measure(*args)))
    except BaseException as err:  # report it to the parent, which raises it
        queue.put(("error", f"{type(err).__name__}: {err}"))
        raise


def _spawned(args: tuple[Any, ...]) -> dict[str, Any]:
    """``measure(*args)`` in a fresh process (its own peak memory)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, args))
    proc.start()
    try:
        status, value = queue.get()
    finally:
        proc.join()
    if status != "ok":
        raise RuntimeError(f"benchmark process {args[1]}/{args[2]} failed: {value}")
    return value


def cached_config(cfg: Config) -> Config:
    """``cfg`` with the teacher-output cache on: its own ``draws``, else :data:`CACHE_DRAWS`."""
    cfg = copy.deepcopy(cfg)
    cfg.teachers.output_cache.draws = cfg.teachers.output_cache.draws or CACHE_DRAWS
    return cfg


def benchmark_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per configuration (mode) for ``benchmark.json``: ``config``, ``steps_per_s``,
    ``samples_per_s``, ``peak_memory_mib``, ``ratio_to_reference_loop`` (real / minimal seconds
    per step, data included), ``ratio_to_task_only`` (this mode's real step against the
    baseline's: the plain multi-task step), ``phase_split`` (fractions of the projected phase:
    ``step``, ``teachers``, ``data``, ``validation``, ``checkpoint``), and for the cached mode
    ``cache`` (per stream: bytes per sample, build seconds when built now)."""
    task_only = results["results"]["baseline"]["real"]["seconds"]["total"]
    rows = []
    for mode, loops in results["results"].items():
        real, minimal = loops["real"], loops["minimal"]
        phase = results["phase"][mode]
        parts = ("step", "teachers", "data", "validation", "checkpoint")
        rows.append({
            "config": mode,
            "steps_per_s": real["steps_per_second"],
            "samples_per_s": real["images_per_second"],
            "peak_memory_mib": real["peak_mib"],
            "ratio_to_reference_loop": real["seconds"]["total"] / minimal["seconds"]["total"],
            "ratio_to_task_only": real["seconds"]["total"] / task_only,
            "phase_split": {k: phase[k] / phase["total"] for k in parts},
            **({"cache": real["cache"]} if real.get("cache") else {}),
        })  # fmt: skip
    return rows


def phase_split(cfg: Config, real: dict[str, Any]) -> dict[str, float]:
    """Projected seconds of a whole phase (``cfg.train``) by part, from one mode's real loop."""
    train = cfg.train
    n = train.max_steps
    evals = n // train.eval_every + (1 if n % train.eval_every else 0)  # as trainer.fit
    checkpoints = (n - 1) // train.checkpoint_every  # none at the last step
    s = real["seconds"]
    split = {
        "step": n * (s["step"] + s["other"]),
        "teachers": n * s["teachers"],
        "data": n * s["data"],
        "validation": evals * real["validation_s"],
        "checkpoint": checkpoints * real["checkpoint_s"],
    }
    return {**split, "total": sum(split.values()), "evaluations": evals,
            "checkpoints": checkpoints}  # fmt: skip


def _teacher_val(
    cfg: Config, data: RunData, accelerator: Any, untrained_teachers: bool
) -> Results | None:
    """The teachers' validation results when the student's selection score needs them (Δm)."""
    if cfg.selection_metric != "delta_m":
        return None
    teachers = _teachers(cfg, data, untrained_teachers)
    for t in teachers.values():
        t.net.to(accelerator.device)
    evaluator = Evaluator(accelerator, cfg.data.eval_batch_size, cfg.data.num_workers)
    teacher_val = evaluate_teachers(evaluator, teachers, data.tasks(), "val", data)
    del teachers, evaluator
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return teacher_val


def run_benchmark(
    cfg: Config,
    steps: int = 20,
    warmup: int = 3,
    untrained_teachers: bool = False,
    spawn: bool = True,
    data: RunData | None = None,
    accelerator: Any = None,
) -> dict[str, Any]:
    """Both modes, both loops; teachers must be under ``teacher_root(cfg)`` unless untrained.

    ``spawn=False`` measures in this process (peak memory is then shared by every measurement).

    Returns:
        ``info`` (preset, tasks, batch sizes, weighting, device, ...), ``results[mode][loop]``
        (see :func:`measure`), ``overhead[mode]`` (real / minimal seconds per step, over
        ``teachers+step`` and over ``total``) and ``phase[mode]`` (:func:`phase_split`).
    """
    accelerator = accelerator or make_accelerator(cfg)
    data = data or resolve_data(cfg, accelerator)
    tasks = data.tasks()
    teacher_val = _teacher_val(cfg, data, accelerator, untrained_teachers)
    results: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        for loop in LOOPS:
            args = (cfg, mode, loop, steps, warmup, teacher_val, untrained_teachers)
            results.setdefault(mode, {})[loop] = _spawned(args) if spawn else measure(*args)
    overhead = {}
    for mode, r in results.items():
        real, minimal = r["real"]["seconds"], r["minimal"]["seconds"]
        compute = (real["teachers"] + real["step"] + real["other"]) / (
            minimal["teachers"] + minimal["step"]
        )
        overhead[mode] = {"teachers+step": compute, "total": real["total"] / minimal["total"]}
    info = {
        "preset": cfg.preset,
        "tasks": list(tasks),
        "batch_sizes": data.batch_sizes(),
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "weighting": cfg.weighting.name,
        "mixed_precision": cfg.mixed_precision,
        "device": results["baseline"]["real"]["device"],
        "threads": results["baseline"]["real"]["threads"],
        "steps": steps,
        "warmup": warmup,
        "untrained_teachers": untrained_teachers,
        "spawned": spawn,
        "torch": torch.__version__,
    }
    phase = {mode: phase_split(cfg, r["real"]) for mode, r in results.items()}
    out = {"info": info, "results": results, "overhead": overhead, "phase": phase}
    return {**out, "rows": benchmark_rows(out)}


# --------------------------------------------------------------------------------------------
# Report


def _rows(results: dict[str, Any]) -> Iterator[str]:
    ms = 1000.0
    yield (
        "| mode | loop | steps/s | img/s | data ms | teachers ms | step ms | other ms | "
        "median ms | peak MiB | page faults/step |"
    )
    yield "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for mode, loops in results["results"].items():
        for loop, r in loops.items():
            s = r["seconds"]
            yield (
                f"| {mode} | {loop} | {r['steps_per_second']:.2f} | "
                f"{r['images_per_second']:.0f} | {s['data'] * ms:.1f} | "
                f"{s['teachers'] * ms:.1f} | {s['step'] * ms:.1f} | {s['other'] * ms:.1f} | "
                f"{s['total_median'] * ms:.1f} | {r['peak_mib']:.0f} | "
                + (f"{s['page_faults']:.0f} |" if "page_faults" in s else "– |")
            )


def format_report(results: dict[str, Any]) -> str:
    """Markdown tables: per-step split and peaks, overhead, and the projected phase split."""
    info = results["info"]
    memory = results["results"]["baseline"]["real"]["memory"]
    lines = [
        f"preset {info['preset']} | tasks {', '.join(info['tasks'])} | batch per stream "
        f"{info['batch_sizes']} x {info['gradient_accumulation_steps']} accumulation | "
        f"weighting {info['weighting']} | mixed precision {info['mixed_precision']} | "
        f"{info['device']}, {info['threads']} threads | torch {info['torch']}",
        f"{info['steps']} timed steps after {info['warmup']} warm-up; means per step (and the "
        "median of the whole step, for noise); "
        f"peak: {memory}"
        + ("; UNTRAINED teachers" if info["untrained_teachers"] else "")
        + ("" if info["spawned"] else "; one process (peaks shared)"),
        "",
        *_rows(results),
        "",
        "| mode | real / minimal (teachers + step) | real / minimal (with data) | "
        "validation s (images) | checkpoint s (MiB) |",
        "|:---|---:|---:|---:|---:|",
    ]
    for mode, o in results["overhead"].items():
        r = results["results"][mode]["real"]
        lines.append(
            f"| {mode} | x{o['teachers+step']:.2f} | x{o['total']:.2f} | "
            f"{r['validation_s']:.2f} ({r['val_images']:.0f}) | "
            f"{r['checkpoint_s']:.3f} ({r['checkpoint_mib']:.1f}) |"
        )
    lines += [
        "",
        "Per configuration (benchmark.json rows): ratios of the real step's mean seconds, data "
        "included; phase shares of the projected phase:",
        "",
        "| config | steps/s | samples/s | peak MiB | / reference loop | / task only | "
        "step | teachers | data | validation | checkpoint |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results.get("rows", []):
        split = row["phase_split"]
        lines.append(
            f"| {row['config']} | {row['steps_per_s']:.2f} | {row['samples_per_s']:.0f} | "
            f"{row['peak_memory_mib']:.0f} | x{row['ratio_to_reference_loop']:.3f} | "
            f"x{row['ratio_to_task_only']:.3f} | "
            + " | ".join(f"{100 * split[k]:.1f}%" for k in
                         ("step", "teachers", "data", "validation", "checkpoint"))
            + " |"
        )  # fmt: skip
    for row in results.get("rows", []):
        for stream, entry in row.get("cache", {}).items():
            built = f", built in {entry['seconds']:.1f} s" if entry["built"] else ", found"
            lines.append(
                f"\nteacher-output cache of {stream!r}: {entry['bytes_per_sample'] / 1024:.1f} KiB "
                f"per sample ({entry['bytes'] / 2**20:.1f} MiB{built})"
            )
    any_phase = next(iter(results["phase"].values()))
    lines += [
        "",
        f"Projected phase ({any_phase['evaluations']:.0f} validations, "
        f"{any_phase['checkpoints']:.0f} checkpoints), seconds (share):",
        "",
        "| mode | step | teachers | data | validation | checkpoint | total |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, p in results["phase"].items():
        cells = [
            f"{p[k]:.1f} ({100 * p[k] / p['total']:.0f}%)"
            for k in ("step", "teachers", "data", "validation", "checkpoint")
        ]
        lines.append(f"| {mode} | {' | '.join(cells)} | {p['total']:.1f} |")
    return "\n".join(lines)


def joint_term_scaling(
    batch: int = 8,
    size: tuple[int, int] = (48, 64),
    task_counts: tuple[int, ...] = (2, 3, 4, 6),
    repeats: int = 5,
    seed: int = 0,
    num_classes: int = 7,
) -> list[dict[str, float]]:
    """Seconds of one forward + backward of MTPSL's and JTR's joint terms against the number of
    tasks T (random predictions and labels, random-labels masks; the tasks cycle through the
    per-pixel kinds of :data:`unirep.tasks.TASK_KINDS`). JTR runs its one network once per stack:
    linear in T through the stacked channels; MTPSL maps every (unlabelled, labelled) pair: up to
    T(T−1) mappings.
    """
    from unirep.data.dense.label_splits import make_label_mask
    from unirep.losses.joint import JTRLoss, MTPSLLoss

    kinds = [TASK_KINDS.build(k) for k in TASK_KINDS.names()]
    kinds = [k for k in kinds if k.spatial]
    rows = []
    g = torch.Generator().manual_seed(seed)
    h, w = size
    for count in task_counts:
        tasks: dict[str, Task] = {}
        for i in range(count):
            kind = kinds[i % len(kinds)]
            name = f"{kind.name}{i}"
            classes = num_classes if kind.has_classes else None
            tasks[name] = Task(name, kind, "images", num_classes=classes)
        names = list(tasks)
        preds = {n: torch.randn(batch, t.out_channels, h, w, generator=g) for n, t in tasks.items()}
        targets = {}
        for n, t in tasks.items():
            if t.kind.has_classes:
                targets[n] = torch.randint(0, num_classes, (batch, h, w), generator=g)
            elif t.kind.unit_vector:
                raw = torch.randn(batch, t.out_channels, h, w, generator=g)
                targets[n] = torch.nn.functional.normalize(raw, dim=1)
            else:
                targets[n] = torch.rand(batch, t.out_channels, h, w, generator=g) * 5
        mask = make_label_mask("random-labels", batch, names, seed)
        masks = {n: mask[:, i] for i, n in enumerate(names)}
        feature = torch.randn(batch, 64, h // 16, w // 16, generator=g)
        kind_names = {n: t.kind.name for n, t in tasks.items()}
        channels = {n: t.out_channels for n, t in tasks.items()}
        mtpsl = MTPSLLoss(kind_names, channels, 64)
        jtr = JTRLoss(kind_names, channels)
        for p in preds.values():
            p.requires_grad_(True)
        timings: dict[str, float] = {"tasks": float(count)}
        args = {"mtpsl": (preds, targets, masks, feature), "jtr": (preds, targets, masks)}
        for label, loss in (("mtpsl", mtpsl), ("jtr", jtr)):
            _joint_total(loss(*args[label])).backward()  # warm-up
            t0 = time.perf_counter()
            for _ in range(repeats):
                _joint_total(loss(*args[label])).backward()
            timings[f"{label}_seconds"] = (time.perf_counter() - t0) / repeats
        timings["mtpsl_pairs"] = float(len(mtpsl.instances(masks)[0]))
        rows.append(timings)
    return rows


def _joint_total(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def format_joint_scaling(rows: list[dict[str, float]]) -> str:
    """Markdown: the joint terms' cost against the number of tasks."""
    lines = [
        "| tasks T | MTPSL (image, pair) mappings | MTPSL fwd+bwd (ms) | JTR fwd+bwd (ms) |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {int(r['tasks'])} | {int(r['mtpsl_pairs'])} | {1000 * r['mtpsl_seconds']:.1f} | "
            f"{1000 * r['jtr_seconds']:.1f} |"
        )
    return "\n".join(lines)


def term_costs(
    configs: dict[str, Config],
    steps: int = 20,
    warmup: int = 3,
    untrained_teachers: bool = False,
    spawn: bool = True,
) -> dict[str, dict[str, Any]]:
    """The student's real train step under each of ``configs`` (e.g. distillation alone, then
    + each cross-task or contrastive term: :data:`unirep.experiments.compare.XTASK_VARIANTS`), each
    measured in a fresh process, and its ratio to the first config's step.

    Returns ``{name: {"seconds": ..., "ratio_step": real (step + teachers + other) / the first's,
    "ratio_total": ..., "device": ..., "threads": ...}}`` (``seconds`` as in :func:`measure`;
    ratios of the means).
    """
    out: dict[str, dict[str, Any]] = {}
    base = next(iter(configs.values()))
    accelerator = make_accelerator(base)
    teacher_val = _teacher_val(base, resolve_data(base, accelerator), accelerator,
                               untrained_teachers)  # fmt: skip
    for name, cfg in configs.items():
        args = (cfg, "student", "real", steps, warmup, teacher_val, untrained_teachers)
        result = _spawned(args) if spawn else measure(*args)
        out[name] = {key: result[key] for key in ("seconds", "device", "threads")}
    return _with_ratios(out, "compute", "total")


OPTION_VARIANTS: dict[str, list[str]] = {
    "default": [],
    "channels_last": ["train.channels_last=true"],
    "compile": ["train.compile=true"],
    "bf16": ["mixed_precision=bf16"],
    "batched teachers": ["teachers.batched=true"],
    "teachers bf16": ["teachers.autocast=bf16"],
}
"""The speed options (``scripts/benchmark.py --options``, and its GPU section): each on its own
against the default, by :func:`term_costs` (each in a fresh process: ``mixed_precision`` is the
accelerator's). ``bf16`` is the run's mixed precision (student and teachers); ``compile`` spends
its compilation in the warm-up steps."""


def _with_ratios(
    rows: dict[str, dict[str, Any]], step: str, total: str
) -> dict[str, dict[str, Any]]:
    """``rows`` with ``ratio_step`` and ``ratio_total``: each row's ``seconds[step]`` and
    ``seconds[total]`` over the first row's (rows without ``seconds``, skipped ones, get none)."""
    first = next(iter(rows.values()))["seconds"]
    for row in rows.values():
        if "seconds" in row:
            row["ratio_step"] = row["seconds"][step] / first[step]
            row["ratio_total"] = row["seconds"][total] / first[total]
    return rows


def format_term_costs(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: the student's step with each term, against the first row."""
    ms = 1000.0
    lines = [
        "| student variant | step (ms) | teachers (ms) | data (ms) | total (ms) | "
        "× step+teachers | × total |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        s = r["seconds"]
        lines.append(
            f"| {name} | {ms * (s['step'] + s['other']):.1f} | {ms * s['teachers']:.1f} | "
            f"{ms * s['data']:.1f} | {ms * s['total']:.1f} | {r['ratio_step']:.2f} | "
            f"{r['ratio_total']:.2f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Task-balancing methods side by side

REFERENCE_WEIGHTING = "sum"
WEIGHTING_METHODS = (
    "sum", "mean", "static", "uncertainty", "restrained_uncertainty", "grouped_uncertainty",
    "dwa", "rlw", "famo", "gradnorm", "imtl", "mgda", "mgda_ub", "pcgrad", "cagrad", "nash_mtl",
    "aligned_mtl", "upgrad", "adatask", "gls", "stch", "gradvac", "graddrop", "fairgrad", "modo",
    "sdmgrad", "dualproj", "excess_mtl", "krum", "trimmed_mean", "config", "pcd", "cr_mogm",
)  # fmt: skip
"""The methods ``scripts/benchmark.py --weightings`` times by default (``imtl``: one row per
mode, ``imtl-l``, ``imtl-g``, ``imtl-h``); any other registered one (e.g. ``alternating``, which
needs ``train.gradient_accumulation_steps=1``) when named."""
IMTL_MODES = ("l", "g", "h")
_ADAM_LIKE = ("adam", "adamw")  # optimizers whose kwargs AdaTask's Adam rule takes as they are


def weighting_variants(
    cfg: Config, tasks: list[str], names: list[str] | None = None, distill: bool = False
) -> dict[str, list[str]]:
    """Row name → config overrides that switch ``cfg`` to each task-balancing method.

    ``names``: registry names of :data:`unirep.weighting.WEIGHTINGS` (``imtl`` gives its three
    modes; ``imtl-g`` one of them); default :data:`WEIGHTING_METHODS`. ``sum`` always comes
    first: the reference of the ratios. Every row sets ``weighting.name`` and
    ``weighting.kwargs`` (the method's defaults, except ``grouped_uncertainty``: the first two
    of ``tasks`` as one group; ``imtl``: its mode); ``adatask`` also sets its optimizer (the
    run's optimizer settings when it is Adam or AdamW). Without ``distill``, every row also
    switches distillation off (``distill.enabled=false``): the plain multi-task model.
    """
    wanted = list(WEIGHTING_METHODS if names is None else names)
    rows: list[str] = []
    for name in dict.fromkeys([REFERENCE_WEIGHTING, *wanted]):
        if name == "imtl":
            rows += [f"imtl-{mode}" for mode in IMTL_MODES]
        elif name in WEIGHTINGS or name in [f"imtl-{mode}" for mode in IMTL_MODES]:
            rows.append(name)
        else:
            modes = ", ".join(f"imtl-{mode}" for mode in IMTL_MODES)
            raise ConfigError(
                f"weighting {name!r} is not registered: valid are {', '.join(WEIGHTINGS.names())}"
                f" and {modes}"
            )
    common = [] if distill else ["distill.enabled=false"]
    variants = {}
    for row in dict.fromkeys(rows):
        method, _, mode = row.partition("-")
        kwargs: dict[str, Any] = {"mode": mode} if mode else {}
        overrides = [f"weighting.name={method}"]
        if method == "grouped_uncertainty":
            kwargs["groups"] = [tasks[:2]]
        if method == "adatask":
            optimizer = cfg.train.optim.optimizer
            kept = optimizer.kwargs if optimizer.name in _ADAM_LIKE else {}
            spec = {"name": "adatask", "kwargs": {**kept, "base": "adam"}}
            overrides.append(f"train.optim.optimizer={json.dumps(spec)}")
        overrides.append(f"weighting.kwargs={json.dumps(kwargs)}")
        variants[row] = [*common, *overrides]
    return variants


def skipped_for_solvers(err: ConfigError) -> str | None:
    """The one-line note of a method skipped because its optional solvers (``unirep[solvers]``)
    do not import, or None when ``err`` is another refusal."""
    return str(err) if SOLVERS_EXTRA in str(err) else None


def weighting_configs(
    cfg: Config, tasks: list[str], names: list[str] | None = None, distill: bool = False
) -> dict[str, Config | str]:
    """:func:`weighting_variants` applied to ``cfg`` (each checked as ``load_config`` checks a
    config); a method whose optional solvers are missing gets its one-line note instead."""
    out: dict[str, Config | str] = {}
    for name, overrides in weighting_variants(cfg, tasks, names, distill).items():
        values = to_dict(cfg)
        for override in overrides:
            apply_override(values, override)
        variant = from_dict(values)
        try:
            validate(variant)
        except ConfigError as err:
            note = skipped_for_solvers(err)
            if note is None:
                raise
            out[name] = note
            continue
        out[name] = variant
    return out


def trunk_passes(module: Any, accumulation: int = 1) -> dict[str, Any]:
    """Passes through the student's shared trunk per optimizer step, from the method's nature.

    ``backward``: full backward passes through the trunk: 1 for a loss weighting, ``T + 1`` for a
    gradient method on the shared parameters (one ``autograd.grad`` per task, one more for the
    joint terms when the objective has any, then the ordinary backward). ``partial``: backward
    passes that stop before the trunk's input, and where they stop (``partial_to``): ``T`` to the
    trunk's output for ``mgda_ub``, ``T`` to the last shared layer for ``gradnorm``. A method
    that updates its task groups one after the other (``alternating``: ``updates`` optimizer
    steps per batch) needs all of that once per group. ``forward``: extra forward passes (one
    per group after the first; FAMO's losses after the step). All times the ``accumulation``
    micro-batches of a step; ``T`` is the number of the weighting's tasks.
    """
    weighting = module.weighting
    tasks = len(weighting.tasks)
    updates = len(weighting.update_groups())
    backward, partial, partial_to = 1, 0, None
    if isinstance(weighting, GradientWeighting) and weighting.on == "parameters":
        backward = 1 + tasks + (1 if len(module.objective.joint) else 0)
    elif isinstance(weighting, GradientWeighting):
        partial, partial_to = tasks, "the trunk's output"
    elif isinstance(weighting, GradNormWeighting):
        partial, partial_to = tasks, "the last shared layer"
    return {
        "backward": backward * updates * accumulation,
        "partial": partial * updates * accumulation,
        "partial_to": partial_to,
        "forward": (updates - 1 + int(weighting.wants_losses_after_step)) * accumulation,
        "updates": updates,
        "tasks": tasks,
    }


def _timing_config(cfg: Config) -> Config:
    """``cfg`` without what is the same for every method and no part of its cost: the task
    diagnostics (``train.diagnostics_every``)."""
    cfg = copy.deepcopy(cfg)
    cfg.train.diagnostics_every = 0
    return cfg


def _step_start(device: torch.device) -> int:
    """CUDA: the peak reset and the bytes allocated now; 0 elsewhere (nothing done)."""
    if device.type != "cuda":
        return 0
    _reset_peak(device)
    return torch.cuda.memory_allocated(device)


def _step_peak_mib(device: torch.device, allocated: int) -> float | None:
    """CUDA: the step's peak above ``allocated`` (:func:`_step_start`), MiB; None elsewhere."""
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - allocated) / 2**20


def weighting_costs(
    configs: dict[str, Config | str],
    steps: int = 20,
    warmup: int = 3,
    untrained_teachers: bool = False,
    data: RunData | None = None,
    accelerator: Any = None,
) -> dict[str, dict[str, Any]]:
    """The student's real train step under each of ``configs`` (the task-balancing methods of
    :func:`weighting_configs`, the reference first; a string is the note of a skipped method),
    alternated step by step.

    Every config is set up in this process (one accelerator, the first config's data; the
    configs must differ in the weighting, its optimizer and distillation only), then each
    step runs :func:`unirep.training.trainer.train_step` once for every method, the order rotated by
    one each step, so that drifts of the machine's load fall on every method alike. Task diagnostics
    and Δm selection are switched off (:func:`_timing_config`). Teachers are loaded (or untrained)
    only when the first config distils or initialises from a teacher.
    The methods share the accelerator (with fp16, its GradScaler's scale too) and its
    accumulation counter, which stays aligned: every ``train_step`` runs a whole step.

    A method whose optional solvers are missing (a ``ConfigError`` naming ``unirep[solvers]``
    when its config is checked or its weighting built) is skipped: its row is
    ``{"skipped": message}``.

    Returns ``{name: {"weighting", "kwargs", "seconds" (as :func:`measure`), "ratio_step"
    (median of teachers + step + other over the first's), "ratio_total" (median whole step over
    the first's), "passes" (:func:`trunk_passes`), "step_peak_mib" (CUDA: the largest peak of a
    step above what was allocated before it; None on CPU, where one process holds every method),
    "device", "threads"}}``.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0 (got {steps}, {warmup})")
    rows, timing = _timed_rows(configs)
    base = next(iter(timing.values()))
    accelerator = accelerator or make_accelerator(base)
    data = data or resolve_data(base, accelerator)
    tasks = data.tasks()
    needs_teachers = base.distill.enabled or bool(
        base.classification and base.classification.init_from_teacher
    )
    teachers = _teachers(base, data, untrained_teachers) if needs_teachers else {}
    device = accelerator.device
    contexts: dict[str, Any] = {}
    # selection never runs here: any reference makes a Δm score function
    reference = {n: {t.main_metric: 1.0} for n, t in tasks.items()}
    with tempfile.TemporaryDirectory(prefix="unirep-bench-") as tmp:
        for name, cfg in timing.items():
            work = Path(tmp) / name
            try:
                phase, _ = student_phase(
                    cfg, accelerator, "student", data, tasks, work, teachers, reference, True
                )
            except ConfigError as err:
                note = skipped_for_solvers(err)
                if note is None:
                    raise
                rows[name] = {"skipped": note}
                continue
            contexts[name], _ = trainer.setup(accelerator, _bench_phase(phase, work))
            contexts[name].module.train()
            rows[name] = {
                "weighting": cfg.weighting.name,
                "kwargs": dict(cfg.weighting.kwargs),
                "passes": trunk_passes(phase.module, cfg.train.gradient_accumulation_steps),
            }
        per_step, peaks = _alternated_steps(contexts, steps, warmup, device)
        del contexts
    for name, timed in per_step.items():
        rows[name].update(seconds=_means(timed), step_peak_mib=peaks[name], device=str(device),
                          threads=torch.get_num_threads())  # fmt: skip
    return _with_ratios(rows, "compute_median", "total_median")


def _timed_rows(
    configs: dict[str, Config | str],
) -> tuple[dict[str, dict[str, Any]], dict[str, Config]]:
    """The rows of :func:`weighting_costs` in the order of ``configs`` (``{"skipped": note}``
    for a note, empty otherwise) and the configs to time (:func:`_timing_config`)."""
    rows: dict[str, dict[str, Any]] = {}
    timing: dict[str, Config] = {}
    for name, cfg in configs.items():
        if isinstance(cfg, str):
            rows[name] = {"skipped": cfg}
        else:
            rows[name] = {}
            timing[name] = _timing_config(cfg)
    return rows, timing


def _alternated_steps(
    contexts: dict[str, Any], steps: int, warmup: int, device: torch.device
) -> tuple[dict[str, list[dict[str, float]]], dict[str, float | None]]:
    """Run ``warmup + steps`` train steps of every method of ``contexts`` (set up by
    :func:`unirep.training.trainer.setup`), the order rotated by one each step; returns each
    method's timings of the steps after the warm-up and its largest step peak (MiB, CUDA;
    None elsewhere)."""
    per_step: dict[str, list[dict[str, float]]] = {name: [] for name in contexts}
    peaks: dict[str, float | None] = dict.fromkeys(contexts)
    order = list(contexts)
    for step in range(warmup + steps):
        shift = step % len(order)
        for name in order[shift:] + order[:shift]:
            allocated = _step_start(device)
            timings = _timed_step(contexts[name], step, device)
            if step >= warmup:
                per_step[name].append(timings)
                peak = _step_peak_mib(device, allocated)
                if peak is not None:
                    peaks[name] = max(peaks[name] or 0.0, peak)
    return per_step, peaks


def _passes_cell(passes: dict[str, Any]) -> str:
    cell = str(passes["backward"])
    if passes["partial"]:
        cell += f" (+{passes['partial']} to {passes['partial_to']})"
    if passes["forward"]:
        cell += f" (+{passes['forward']} forward)"
    return cell


def format_weighting_costs(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: each method's step against the first row's (``sum``), then one line per method
    that was skipped."""
    ms = 1000.0
    first = next(iter(rows))
    lines = [
        f"| method | ms/step (median) | × {first} | without data (ms, median) | "
        f"× {first} without data | backward passes through the trunk | step peak MiB |",
        "|:---|---:|---:|---:|---:|:---|---:|",
    ]
    skipped = []
    for name, r in rows.items():
        if "skipped" in r:
            skipped.append(f"skipped {name}: {r['skipped']}")
            continue
        s, peak = r["seconds"], r["step_peak_mib"]
        lines.append(
            f"| {name} | {ms * s['total_median']:.1f} | {r['ratio_total']:.2f} | "
            f"{ms * s['compute_median']:.1f} | {r['ratio_step']:.2f} | "
            f"{_passes_cell(r['passes'])} | {'—' if peak is None else f'{peak:.0f}'} |"
        )
    return "\n".join(lines + ([""] if skipped else []) + skipped)
