"""Worker of tests/e2e/test_weighting_distributed.py: every gradient method under DDP on two CPUs.

Run as ``accelerate launch --multi_gpu --num_processes 2 tests/weighting_ddp_worker.py OUT``.
For each method of :data:`METHODS`, each rank trains a fresh copy of the same tiny two-task model
on its own data for one accumulation window of :data:`MICRO_BATCHES` micro-batches and records
its gradients (all parameters, after the window) and the logs; everything goes to ``OUT.rank<i>``.
The test imports :func:`build_model`, :func:`rank_batches` and :func:`make_bundle` to compute the
one-process result on the global batches.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

TASKS = ["a", "b"]
MICRO_BATCHES = 2
BATCH = 5  # per rank and micro-batch
METHODS: dict[str, dict[str, Any]] = {
    "mgda": {},
    "mgda_ub": {},
    "pcgrad": {"seed": 3},
    "cagrad": {},
    "imtl": {"mode": "h"},
    "nash_mtl": {},
    "aligned_mtl": {},
    "upgrad": {},
    # torchjd's (issue 26); krum needs 3 tasks, trimmed_mean trims nothing with 2
    "gradvac": {"seed": 5},
    "graddrop": {"seed": 7, "leak": 0.1},
    "fairgrad": {},
    "modo": {"gamma": 0.1},
    "sdmgrad": {},
    "dualproj": {},
    "excess_mtl": {},
    "trimmed_mean": {},
    "config": {},
    "pcd": {"tau": 0.3},
    "cr_mogm": {},
    "gls": {},
    "stch": {"warmup_steps": 0, "nadir_steps": 0},
    # ours (issue 26): state from process-averaged gradients and losses
    "moco": {},
    "db_mtl": {},
    "ntkmtl": {},
    "go4align": {"num_groups": 2, "robust_step_size": 0.1},
}
"""Every gradient method (registry name → kwargs), and the non-linear loss scalarizations
(``gls``, ``stch``: linearised at the process-averaged losses, combined per micro-batch)."""


class TinyTwoTask(nn.Module):
    """A shared linear trunk (``[B, 4] → [B, 3]``, tanh) and one linear head per task; the last
    forward's trunk output is :attr:`z` (``bundle.shared``, for ``mgda_ub``)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 3)
        self.heads = nn.ModuleDict({t: nn.Linear(3, 1) for t in TASKS})
        self.z: Tensor | None = None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = torch.tanh(self.trunk(x))
        self.z = z
        return {t: head(z).squeeze(-1) for t, head in self.heads.items()}


def build_model() -> TinyTwoTask:
    """The same initial weights on every process."""
    torch.manual_seed(0)
    return TinyTwoTask()


def rank_batches(rank: int) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """``MICRO_BATCHES`` batches of ``BATCH`` inputs for ``rank``, with targets that partly
    conflict (the tasks' shared gradients point apart, but not exactly opposite)."""
    gen = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(MICRO_BATCHES):
        x = torch.randn(BATCH, 4, generator=gen)
        base, other = torch.randn(BATCH, generator=gen), torch.randn(BATCH, generator=gen)
        out.append((x, {"a": 2.0 * base + 1.0, "b": -base + other}))
    return out


def make_bundle(model: TinyTwoTask, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> Any:
    """Per-sample means only (a global batch's loss is the mean of the ranks'): supervised
    squared errors, a distillation term on task a, a joint term, and the trunk output."""
    from unirep.losses.bundle import LossBundle

    return LossBundle(
        supervised={t: ((outputs[t] - targets[t]) ** 2).mean() for t in TASKS},
        distill={"a": {"feature": 0.1 * outputs["a"].pow(2).mean()}},
        joint={"consistency": 0.05 * (outputs["a"] + outputs["b"]).pow(2).mean()},
        shared=[model.z],
    )


def grads(module: nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter's gradient, by name."""
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def main(out: str) -> None:
    from accelerate import Accelerator

    from unirep.weighting import build_weighting

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=MICRO_BATCHES)
    assert accelerator.num_processes == 2, accelerator.num_processes
    rank = accelerator.process_index
    record: dict[str, Any] = {"rank": rank, "methods": {}}
    for name, kwargs in METHODS.items():
        model = build_model()
        model.weighting = build_weighting(name, TASKS, **kwargs)
        ddp = accelerator.prepare(model)
        assert isinstance(ddp, nn.parallel.DistributedDataParallel), type(ddp)
        torch.manual_seed(1000 + rank)  # different global RNG per process: must not matter
        inner = accelerator.unwrap_model(ddp)
        shared = list(inner.trunk.parameters())
        syncs, logs = [], []
        for x, targets in rank_batches(rank):
            with accelerator.accumulate(ddp):
                bundle = make_bundle(inner, ddp(x), targets)
                logs.append(inner.weighting.backward(bundle, shared, accelerator))
                syncs.append(accelerator.sync_gradients)
        state = {k: v.clone() for k, v in inner.weighting.state_dict().items()}
        record["methods"][name] = {"sync": syncs, "logs": logs, "grads": grads(inner),
                                   "state": state}  # fmt: skip
        accelerator.free_memory()
    torch.save(record, f"{out}.rank{rank}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
