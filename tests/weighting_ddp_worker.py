"""Worker of tests/test_weighting_distributed.py: ``pcgrad`` under DDP with two CPU processes.

Run as ``accelerate launch --multi_gpu --num_processes 2 tests/weighting_ddp_worker.py OUT``.
Each rank trains the same tiny two-task model on its own data for one accumulation window of
:data:`MICRO_BATCHES` micro-batches and saves its gradients to ``OUT.rank<i>``. The test imports
:func:`build_model` and :func:`rank_batches` to compute the reference in one process.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

TASKS = ["a", "b"]
MICRO_BATCHES = 2


class TinyTwoTask(nn.Module):
    """A shared linear trunk (``[B, 4] → [B, 3]``, tanh) and one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 3)
        self.heads = nn.ModuleDict({t: nn.Linear(3, 1) for t in TASKS})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = torch.tanh(self.trunk(x))
        return {t: head(z).squeeze(-1) for t, head in self.heads.items()}


def build_model() -> TinyTwoTask:
    """The same initial weights on every process."""
    torch.manual_seed(0)
    return TinyTwoTask()


def rank_batches(rank: int) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """``MICRO_BATCHES`` batches of 5 inputs for ``rank``, with targets that pull apart."""
    gen = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(MICRO_BATCHES):
        x = torch.randn(5, 4, generator=gen)
        base = torch.randn(5, generator=gen)
        out.append((x, {"a": 2.0 * base + 1.0, "b": -2.0 * base - 1.0}))
    return out


def task_losses(outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
    """Mean squared error per task (scalars)."""
    return {t: ((outputs[t] - targets[t]) ** 2).mean() for t in TASKS}


def grads(module: nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter's gradient, by name."""
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def main(out: str) -> None:
    from accelerate import Accelerator

    from unirep.losses.bundle import LossBundle
    from unirep.weighting import build_weighting

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=MICRO_BATCHES)
    assert accelerator.num_processes == 2, accelerator.num_processes
    rank = accelerator.process_index
    model = build_model()
    model.weighting = build_weighting("pcgrad", TASKS)
    ddp = accelerator.prepare(model)
    assert isinstance(ddp, nn.parallel.DistributedDataParallel), type(ddp)
    torch.manual_seed(1000 + rank)  # different global RNG per process: must not matter
    inner = accelerator.unwrap_model(ddp)
    shared = list(inner.trunk.parameters())

    record: dict[str, object] = {"rank": rank, "steps": []}
    for x, targets in rank_batches(rank):
        with accelerator.accumulate(ddp):
            bundle = LossBundle(supervised=task_losses(ddp(x), targets))
            logs = inner.weighting.backward(bundle, shared, accelerator)
            record["steps"].append(
                {"sync": accelerator.sync_gradients, "grads": grads(inner), "logs": logs}
            )
    torch.save(record, f"{out}.rank{rank}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
