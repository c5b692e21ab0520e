"""Every weighting through the real train step, on both kinds of run: the student phase of a tiny
classification and a tiny dense config takes two optimizer steps with each method (with
distillation's adapters, so every parameter group is in play) and every logged term is finite."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config, tiny_dense_config
from unirep.weighting import WEIGHTINGS

SETTINGS = {
    "adatask": ["weighting.name=adatask", "train.optim.optimizer={name: adatask}"],
    "grouped_uncertainty": [],  # groups from the run's tasks, below
}


def _settings(name: str, tasks: list[str]) -> list[str]:
    if name == "grouped_uncertainty":
        return [f"weighting={{name: grouped_uncertainty, kwargs: {{groups: [[{tasks[0]}, "
                f"{tasks[1]}]]}}}}"]  # fmt: skip
    return SETTINGS.get(name, [f"weighting.name={name}"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classification", "dense"])
def test_every_weighting_trains_both_kinds(kind: str, tiny_cache: Path, tmp_path: Path) -> None:
    from accelerate import Accelerator

    import unirep.training.trainer as trainer_module
    from unirep.pipeline.stage_two import resolve_data, student_phase

    torch.set_num_threads(1)
    build = tiny_config if kind == "classification" else tiny_dense_config
    extra = ["classification.init_from_teacher=null"] if kind == "classification" else []
    accelerator = Accelerator(cpu=True)
    data = resolve_data(build(tiny_cache, tmp_path, *extra), accelerator)
    tasks = data.tasks()
    names = list(tasks)
    reference = {n: {t.main_metric: 1.0} for n, t in tasks.items()}
    failures = []
    for name in WEIGHTINGS.names():
        cfg = build(tiny_cache, tmp_path / name, *extra, *_settings(name, names))
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
    assert not failures, failures
