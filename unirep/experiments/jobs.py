"""A small scheduler that runs independent jobs side by side in worker processes.

:func:`run_jobs` runs a graph of jobs (e.g. whole runs, :func:`unirep.pipeline.api.run_recipe`,
and the teachers they share, :func:`unirep.pipeline.api.train_teacher_job`) on ``workers`` worker
processes (``spawn``), each at the calling process's thread count, starting a job as soon as the
jobs it depends on are finished: a comparison of variants × seeds on a 2-core machine keeps both
cores busy with one-thread runs instead of one run that a small model cannot spread over two
threads. A run computes the same numbers in a worker as in the calling process at the same
thread count (tested), because every run seeds itself and owns its folder; teachers are keyed by
what determines them (:func:`unirep.stage_one.keys.teacher_key`), so runs that share them wait for
one job that trains them.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from unirep.errors import ConfigError


@dataclass
class Job:
    """One call ``fn(*args)`` that starts once every job named in ``after`` has finished."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    after: list[str] = field(default_factory=list)
    priority: int = 0  # among the jobs ready to start, the lowest priority starts first


@dataclass
class JobResult:
    value: Any
    seconds: float


def _timed(threads: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> JobResult:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    value = fn(*args)
    return JobResult(value, time.perf_counter() - start)


def run_jobs(
    jobs: list[Job],
    workers: int,
    on_done: Callable[[str, JobResult], list[Job]] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, JobResult]:
    """Run ``jobs`` (a graph through ``Job.after``) on ``workers`` processes, or in this process
    when ``workers`` is 1. ``on_done(name, result)`` may add jobs (e.g. one whose arguments
    depend on finished results). The first failing job's error is raised once the running ones
    stop; the jobs not yet started are cancelled."""
    threads = torch.get_num_threads()
    pending = {job.name: job for job in jobs}
    done: dict[str, JobResult] = {}
    started: set[str] = set()

    def ready() -> list[Job]:
        ready = [j for j in pending.values() if all(a in done for a in j.after)]
        return sorted(ready, key=lambda j: j.priority)  # stable: then in the order given

    def finish(name: str, result: JobResult) -> None:
        done[name] = result
        log(f"[jobs] {name} finished in {result.seconds:.0f} s")
        for job in on_done(name, result) if on_done else []:
            pending[job.name] = job

    def check_graph() -> None:
        known = set(pending) | started
        for job in pending.values():
            missing = [a for a in job.after if a not in known]
            if missing:
                raise ConfigError(f"job {job.name!r} waits for unknown jobs {missing}")

    check_graph()
    if workers <= 1:
        while pending:
            batch = ready()
            if not batch:
                raise ConfigError(f"jobs {sorted(pending)} wait for each other")
            job = pending.pop(batch[0].name)
            started.add(job.name)
            finish(job.name, _timed(threads, job.fn, job.args))
            check_graph()
        return done
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        running: dict[Future[JobResult], str] = {}
        while pending or running:
            for job in ready():
                if len(running) >= workers:
                    break
                del pending[job.name]
                started.add(job.name)
                running[pool.submit(_timed, threads, job.fn, job.args)] = job.name
                log(f"[jobs] {job.name} started")
            if not running:
                raise ConfigError(f"jobs {sorted(pending)} wait for each other")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                error = future.exception()
                if error is not None:
                    for other in running:
                        other.cancel()
                    wait(running)
                    raise error
                finish(name, future.result())
            check_graph()
    return done
