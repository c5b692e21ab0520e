"""The stateful weightings of issue 26 (``moco``, ``db_mtl``, ``ntkmtl``, ``go4align``) through the
real train step of a tiny dense run, checkpointed and resumed: a fresh phase loads the checkpoint
(MoCo's and DB-MTL's ``[T, n]`` states fit because the trainable module sizes them before the
load) and its next step equals the uninterrupted run's, bit for bit. ``ntkmtl`` and ``mgda`` run
on ``path: auto``: the probe put them on the Gramian path at step 2, and the checkpoint's
``route_code`` puts the resumed run there before its first forward (without it, the resumed
step would probe on the Jacobian path again, a float32 ulp away)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tiny_dense_config

METHODS = ["moco", "db_mtl", "ntkmtl", "go4align", "mgda"]


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_stateful_weighting_resumes_bit_exactly(
    name: str, tiny_cache: Path, tmp_path: Path
) -> None:
    from accelerate import Accelerator

    import unirep.training.trainer as trainer_module
    from unirep.pipeline.stage_two import resolve_data, student_phase
    from unirep.training.checkpoint import save_checkpoint

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    setting = f"weighting.name={name}"
    cfg = tiny_dense_config(tiny_cache, tmp_path, setting)
    data = resolve_data(cfg, accelerator)
    tasks = data.tasks()
    reference = {n: {t.main_metric: 1.0} for n, t in tasks.items()}

    def phase(run: str) -> Any:
        built, _ = student_phase(cfg, accelerator, "student", data, tasks, tmp_path / run, {},
                                 reference, False)  # fmt: skip
        return built

    ctx, _ = trainer_module.setup(accelerator, phase("a"))
    for step in range(2):
        trainer_module.train_step(ctx, step)
    state = {"best_val": None, "best_step": -1, "seconds": 0.0, "skipped_steps": 0}
    directory = tmp_path / "ckpt"
    save_checkpoint(accelerator, directory, 2, ctx.module, ctx.optimizers, ctx.schedulers, state, 1)
    weighting_state = {k: v.clone() for k, v in ctx.unwrapped.weighting.state_dict().items()}
    trainer_module.train_step(ctx, 2)
    want = [p.detach().clone() for p in ctx.unwrapped.parameters()]

    resumed = phase("b")
    resumed.resume_from = next(directory.iterdir())
    ctx2, record = trainer_module.setup(accelerator, resumed)
    assert record["step"] == 2
    for key, value in ctx2.unwrapped.weighting.state_dict().items():
        assert torch.equal(value, weighting_state[key]), key
    if name in ("moco", "db_mtl"):
        assert weighting_state["aggregator.tracked"].shape[1] > 0
    if name in ("ntkmtl", "mgda"):  # the probe at step 2 chose the Gramian path
        assert int(weighting_state["route_code"]) == 2
    trainer_module.train_step(ctx2, 2)
    got = list(ctx2.unwrapped.parameters())
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), name
