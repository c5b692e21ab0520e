"""Every gradient method's 2-process result equals the 1-process one on the global batch.

One ``accelerate launch --multi_gpu --num_processes 2`` run (CPU, gloo) of
tests/weighting_ddp_worker.py: for each gradient method, each rank runs one accumulation window
of two micro-batches on its own data. The reference, here in one process with the same weighting:
the same window on the global batches (micro-batch k of rank 0 and of rank 1, concatenated; every
loss is a per-sample mean, so the global loss is the ranks' mean). The methods on the parameters
combine the window's Jacobian once (averaged over the processes before combining); ``mgda_ub``
combines per micro-batch (its Gramian reduced over the processes), as the reference run does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.unit.weighting.test_weighting import FakeAccelerator
from tests.weighting_ddp_worker import (
    METHODS,
    MICRO_BATCHES,
    TASKS,
    build_model,
    make_bundle,
    rank_batches,
)
from unirep.weighting import build_weighting

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _one_process(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The window on the global batches, in this process."""
    per_rank = [rank_batches(rank) for rank in range(2)]
    model = build_model()
    model.weighting = build_weighting(name, TASKS, **kwargs)
    accelerator = FakeAccelerator(gradient_accumulation_steps=MICRO_BATCHES)
    shared = list(model.trunk.parameters())
    logs = []
    for step in range(MICRO_BATCHES):
        x = torch.cat([per_rank[rank][step][0] for rank in range(2)])
        targets = {t: torch.cat([per_rank[r][step][1][t] for r in range(2)]) for t in TASKS}
        accelerator.sync_gradients = step == MICRO_BATCHES - 1
        bundle = make_bundle(model, model(x), targets)
        logs.append(model.weighting.backward(bundle, shared, accelerator))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = {k: v.clone() for k, v in model.weighting.state_dict().items()}
    return {"grads": grads, "logs": logs, "state": state}


def test_every_gradient_method_two_processes_equal_one(tmp_path: Path) -> None:
    out = tmp_path / "grads.pt"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29597",
        str(ROOT / "tests" / "weighting_ddp_worker.py"), str(out),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    records = [torch.load(f"{out}.rank{rank}") for rank in range(2)]
    assert [r["rank"] for r in records] == [0, 1]
    assert set(records[0]["methods"]) == set(METHODS) == set(records[1]["methods"])
    for name, kwargs in METHODS.items():
        rank0, rank1 = records[0]["methods"][name], records[1]["methods"][name]
        assert rank0["sync"] == [False, True], name
        want = _one_process(name, kwargs)
        assert set(rank0["grads"]) == set(want["grads"]), name
        for pname, grad in want["grads"].items():
            torch.testing.assert_close(
                rank0["grads"][pname], grad, atol=1e-6, rtol=0, msg=f"{name}: {pname}"
            )
            torch.testing.assert_close(
                rank1["grads"][pname], grad, atol=1e-6, rtol=0, msg=f"{name}: {pname}"
            )
        # both processes combine the same averaged matrix: identical shared gradients and logs
        for pname in ("trunk.weight", "trunk.bias"):
            assert torch.equal(rank0["grads"][pname], rank1["grads"][pname]), (name, pname)
        assert rank0["logs"] == rank1["logs"], name
        for got, expected in zip(rank0["logs"], want["logs"], strict=True):
            assert set(got) == set(expected), name
            assert got == pytest.approx(expected, abs=1e-5), name
        for key, value in want["state"].items():  # e.g. Nash-MTL's α, the calls
            torch.testing.assert_close(rank0["state"][key], value, atol=1e-6, rtol=0, msg=key)
        if name == "nash_mtl":
            assert int(rank0["state"]["aggregator.failures"]) == 0, "a meaningful α"
        if name not in ("mgda_ub", "gls", "stch", "go4align"):  # combined at the window's end
            assert rank0["logs"][0] == {}, name
