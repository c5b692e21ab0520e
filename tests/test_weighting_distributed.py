"""``pcgrad`` under ``accelerate launch --multi_gpu`` with two CPU processes against a reference.

The worker (tests/weighting_ddp_worker.py) runs one accumulation window of two micro-batches, each
rank on its own data. The reference, computed here in one process: per micro-batch, each task's
shared gradient on each rank's data, averaged over the ranks, then combined by the PCGrad rule;
the heads get the rank average of their plain gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from tests.weighting_ddp_worker import MICRO_BATCHES, TASKS, build_model, rank_batches, task_losses

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _pcgrad_two(g_a: Tensor, g_b: Tensor) -> Tensor:
    """Yu et al. 2020, Alg. 1 for two tasks: project each onto the other's normal if they
    conflict, then sum (torchjd's PCGrad sums the projected gradients)."""
    dot = g_a @ g_b
    if dot >= 0:
        return g_a + g_b
    return (g_a - dot / (g_b @ g_b) * g_b) + (g_b - dot / (g_a @ g_a) * g_a)


def _reference() -> tuple[list[dict[str, Tensor]], list[float]]:
    """Expected gradients after each micro-batch (rank 0's view) and the gradcos of each."""
    model = build_model()
    shared = list(model.trunk.parameters())
    heads = [(n, p) for n, p in model.named_parameters() if n.startswith("heads.")]
    per_rank = [rank_batches(rank) for rank in range(2)]
    shared_total = [torch.zeros_like(p) for p in shared]
    head_local = {n: torch.zeros_like(p) for n, p in heads}  # rank 0's, before the sync
    head_mean = {n: torch.zeros_like(p) for n, p in heads}
    expected, cosines = [], []
    for step in range(MICRO_BATCHES):
        jac = {t: torch.zeros(sum(p.numel() for p in shared)) for t in TASKS}
        for rank in range(2):
            x, targets = per_rank[rank][step]
            for task in TASKS:  # one forward/backward per task: the naive per-task gradient
                model.zero_grad()
                (task_losses(model(x), targets)[task] / MICRO_BATCHES).backward()
                jac[task] += torch.cat([p.grad.reshape(-1) for p in shared]) / 2
            model.zero_grad()  # the heads: a plain backward of the sum
            (sum(task_losses(model(x), targets).values()) / MICRO_BATCHES).backward()
            for n, p in heads:
                head_mean[n] += p.grad / 2
                if rank == 0:
                    head_local[n] += p.grad
        assert jac["a"] @ jac["b"] < 0, "the data must make the tasks conflict"
        cosines.append(float(jac["a"] @ jac["b"] / (jac["a"].norm() * jac["b"].norm())))
        combined = _pcgrad_two(jac["a"], jac["b"])
        offset = 0
        for i, p in enumerate(shared):
            shared_total[i] += combined[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        heads_now = head_mean if step == MICRO_BATCHES - 1 else head_local
        grads = {f"trunk.{n}": shared_total[i].clone() for i, (n, _) in enumerate(
            model.trunk.named_parameters())}  # fmt: skip
        grads.update({n: g.clone() for n, g in heads_now.items()})
        expected.append(grads)
    return expected, cosines


def test_pcgrad_two_processes_matches_reference(tmp_path: Path) -> None:
    out = tmp_path / "grads.pt"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
        str(ROOT / "tests" / "weighting_ddp_worker.py"), str(out),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    records = [torch.load(f"{out}.rank{rank}") for rank in range(2)]
    assert [r["rank"] for r in records] == [0, 1]
    expected, cosines = _reference()
    steps0, steps1 = records[0]["steps"], records[1]["steps"]
    assert [s["sync"] for s in steps0] == [False, True]
    for step, (got, want) in enumerate(zip(steps0, expected, strict=True)):
        assert set(got["grads"]) == set(want), step
        for name, grad in want.items():
            torch.testing.assert_close(got["grads"][name], grad, atol=1e-6, rtol=0, msg=name)
        assert got["logs"]["gradcos/a~b"] == pytest.approx(cosines[step], abs=1e-6)
        # both processes combine the same averaged matrix: identical shared gradients and logs
        for name in ("trunk.weight", "trunk.bias"):
            assert torch.equal(got["grads"][name], steps1[step]["grads"][name]), (step, name)
        assert got["logs"] == steps1[step]["logs"]
    # after the synchronising micro-batch every parameter agrees across processes
    for name, grad in steps0[-1]["grads"].items():
        torch.testing.assert_close(grad, steps1[-1]["grads"][name], atol=1e-7, rtol=0)
