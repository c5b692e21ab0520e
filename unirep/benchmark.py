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


def measure_step(
    cfg: Config,
    distill: bool,
    domains: dict[str, int],
    steps: int,
    warmup: int,
    chunk_seconds: float = 10.0,
) -> dict[str, Any]:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
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
        "images_per_second": steps_per_second * sum(batch.values()),
        "peak_memory_mib": peak_mib,
        "memory": memory_kind,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def _child(
    queue: Any, cfg: Config, distill: bool, domains: dict[str, int], steps: int, warmup: int
) -> None:
    queue.put(measure_step(cfg, distill, domains, steps, warmup))


def run_benchmark(
    cfg: Config, domains: dict[str, int], steps: int = 150, warmup: int = 2
) -> dict[str, Any]:
    """``{"task_only": ..., "distillation": ..., "ratio": ...}``, each mode in a fresh process."""
    ctx = mp.get_context("spawn")
    results = {}
    for name, distill in (("task_only", False), ("distillation", True)):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(queue, cfg, distill, domains, steps, warmup))
        proc.start()
        results[name] = queue.get()
        proc.join()
    a, b = results["task_only"], results["distillation"]
    results["ratio"] = {
        "time_per_step": a["steps_per_second"] / b["steps_per_second"],
        "peak_memory": b["peak_memory_mib"] / a["peak_memory_mib"],
    }
    return results
