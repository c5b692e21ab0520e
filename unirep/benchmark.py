"""Step throughput and peak memory of the student's training step, with and without distillation.

(a) the student on the task loss alone (the no-distillation baseline's step);
(b) the distillation step: the same student plus alignment adapters, with every domain's frozen
teacher run online on the same batch, and the feature and prediction losses.
Batches are random tensors of the preset's shape (one batch per domain, the preset's batch
sizes), so the figures measure the step, not the data loading. Each mode runs in its own process
so that peak memory (CUDA: ``max_memory_allocated``; CPU: peak resident set size) is its own.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from typing import Any

import torch

from unirep.config import Config
from unirep.models.network import build_network
from unirep.objective import build_objective
from unirep.optim import build_optimizer
from unirep.pipeline import build_student


def _dense_step(
    cfg: Config, distill: bool, size: tuple[int, int], device: torch.device
) -> tuple[Any, int]:
    """A dense training step on a random batch (the student, and online teachers if distilled)."""
    from unirep.dense_pipeline import build_dense_student, dense_architecture, task_channels_for
    from unirep.models.dense import build_dense_from_architecture
    from unirep.objective import build_dense_objective

    assert cfg.dense is not None
    dense = cfg.dense
    channels = task_channels_for(list(dense.tasks), dense.num_classes)
    teachers = {}
    if distill:
        for task, k in channels.items():
            net = build_dense_from_architecture(dense_architecture(cfg), {task: k})
            teachers[task] = net.to(device).eval()
    align = {t: dense.decoder_channels for t in channels} if distill else None
    student = build_dense_student(cfg, channels, align).to(device)
    spec = cfg.train.optim.optimizer
    optimizer = build_optimizer(spec.name, student.parameters(), spec.kwargs)
    objective = build_dense_objective(dense.tasks, cfg.distill, distill)
    b, (h, w) = cfg.data.batch_size, size
    images = torch.rand(b, 3, h, w, device=device)
    targets = {
        "semantic": torch.randint(0, dense.num_classes, (b, h, w), device=device),
        "depth": torch.rand(b, 1, h, w, device=device) + 0.5,
        "normal": torch.nn.functional.normalize(torch.randn(b, 3, h, w, device=device), dim=1),
    }
    targets = {t: targets[t] for t in channels}

    def step() -> None:
        teacher_out = None
        if distill:
            with torch.no_grad():
                teacher_out = {t: m(images)[t] for t, m in teachers.items()}
        loss = objective(student(images), targets, teacher_out, 0, 1)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, b


def measure_step(
    cfg: Config,
    distill: bool,
    domains: dict[str, int],
    steps: int,
    warmup: int,
    chunk_seconds: float = 10.0,
    dense_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Steps/s, images/s and peak memory of one mode (``domains`` unused for dense configs)."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    if cfg.dense is not None:
        if dense_size is None:
            raise ValueError("dense configs need dense_size=(height, width)")
        step, images_per_step = _dense_step(cfg, distill, dense_size, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return _time(step, images_per_step, steps, warmup, chunk_seconds, device)
    feature_dims: dict[str, int] = {}
    teachers = {}
    if distill:
        for d, k in domains.items():
            teachers[d] = (
                build_network(cfg.model.backbone, cfg.model.backbone_kwargs, {d: k})
                .to(device)
                .eval()
            )
            feature_dims[d] = teachers[d].feature_dim
    student = build_student(cfg, domains, feature_dims, distill).to(device)
    spec = cfg.train.optim.optimizer
    optimizer = build_optimizer(spec.name, student.parameters(), spec.kwargs)
    objective = build_objective(cfg.distill, distill)
    batch = {d: cfg.data.batch_sizes.get(d, cfg.data.batch_size) for d in domains}
    crop = {d: cfg.data.crops.get(d, cfg.data.crop) for d in domains}
    images = {d: torch.randn(b, 3, crop[d], crop[d], device=device) for d, b in batch.items()}
    labels = {d: torch.randint(0, domains[d], (b,), device=device) for d, b in batch.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        teacher_out = None
        if distill:
            with torch.no_grad():
                teacher_out = {d: teachers[d]({d: x})[d] for d, x in images.items()}
        loss = objective(student(images), labels, teacher_out, 0, 1)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _time(step, sum(batch.values()), steps, warmup, chunk_seconds, device)


def _time(
    step: Any,
    images_per_step: int,
    steps: int,
    warmup: int,
    chunk_seconds: float,
    device: torch.device,
) -> dict[str, Any]:
    for _ in range(warmup):
        step()
    # the median of five timed chunks (each at most `chunk_seconds`, so that large models on a
    # CPU finish): robust to a busy core now and then
    chunk = max(1, steps // 5)
    rates = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = 0
        while done < chunk and (done == 0 or time.perf_counter() - t0 < chunk_seconds):
            step()
            done += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(done / (time.perf_counter() - t0))
    steps_per_second = statistics.median(rates)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
        memory_kind = "CUDA allocated"
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        memory_kind = "process RSS"
    return {
        "steps_per_second": steps_per_second,
        "images_per_second": steps_per_second * images_per_step,
        "peak_memory_mib": peak_mib,
        "memory": memory_kind,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def _child(
    queue: Any,
    cfg: Config,
    distill: bool,
    domains: dict[str, int],
    steps: int,
    warmup: int,
    dense_size: tuple[int, int] | None,
) -> None:
    queue.put(measure_step(cfg, distill, domains, steps, warmup, dense_size=dense_size))


def run_benchmark(
    cfg: Config,
    domains: dict[str, int],
    steps: int = 150,
    warmup: int = 2,
    dense_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """``{"task_only": ..., "distillation": ..., "ratio": ...}``, each mode in a fresh process.

    ``dense_size`` is the ``(height, width)`` of a dense config's images.
    """
    ctx = mp.get_context("spawn")
    results = {}
    for name, distill in (("task_only", False), ("distillation", True)):
        queue = ctx.Queue()
        args = (queue, cfg, distill, domains, steps, warmup, dense_size)
        proc = ctx.Process(target=_child, args=args)
        proc.start()
        results[name] = queue.get()
        proc.join()
    a, b = results["task_only"], results["distillation"]
    results["ratio"] = {
        "time_per_step": a["steps_per_second"] / b["steps_per_second"],
        "peak_memory": b["peak_memory_mib"] / a["peak_memory_mib"],
    }
    return results
