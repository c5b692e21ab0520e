"""torchjd's methods (issue 26) through the real train step: the student phase of a tiny
mini-scenes config takes two optimizer steps with each, its logs finite and the shared trunk
moved (tests/e2e/test_weighting_runs.py runs every weighting the same way on both kinds)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_dense_config

METHODS = {
    "gls": [], "stch": ["weighting.kwargs={warmup_steps: 1, nadir_steps: 0}"],
    "gradvac": [], "graddrop": [], "fairgrad": [], "modo": [], "sdmgrad": [], "dualproj": [],
    "excess_mtl": [], "krum": [], "trimmed_mean": [], "config": [], "pcd": [], "cr_mogm": [],
}  # fmt: skip


@pytest.mark.slow
def test_torchjd_methods_train_a_dense_student(tiny_cache: Path, tmp_path: Path) -> None:
    from accelerate import Accelerator

    import unirep.training.trainer as trainer_module
    from unirep.pipeline.stage_two import resolve_data, student_phase

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    data = resolve_data(tiny_dense_config(tiny_cache, tmp_path), accelerator)
    tasks = data.tasks()
    assert len(tasks) >= 3, list(tasks)  # krum needs n_byzantine + 3 tasks
    reference = {n: {t.main_metric: 1.0} for n, t in tasks.items()}
    failures = []
    for name, extra in METHODS.items():
        cfg = tiny_dense_config(tiny_cache, tmp_path / name, f"weighting.name={name}", *extra)
        phase, _ = student_phase(
            cfg, accelerator, "student", data, tasks, tmp_path / name, {}, reference, False
        )
        ctx, _ = trainer_module.setup(accelerator, phase)
        before = [p.detach().clone() for p in ctx.unwrapped.shared_parameters()]
        for step in range(2):
            logs = trainer_module.train_step(ctx, step)
        after = ctx.unwrapped.shared_parameters()
        if not all(math.isfinite(float(v)) for v in logs.values()):
            failures.append(f"{name}: non-finite logs {logs}")
        elif all(torch.equal(a, b) for a, b in zip(before, after, strict=True)):
            failures.append(f"{name}: the shared parameters did not move")
        elif not any(k.startswith("weight/") for k in logs) and name not in ("graddrop",
                    "trimmed_mean", "config"):  # fmt: skip
            failures.append(f"{name}: no weights logged {sorted(logs)}")
    assert not failures, failures
