"""Helpers for the reference tests of the stateful weightings (moco, db_mtl, ntkmtl, go4align):
a tiny multi-task model trained a few SGD steps by a weighting, and the same steps by a port of
the method's reference code, on the naive per-task gradients (each from its own backward)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from tests.unit.weighting.test_weighting import FakeAccelerator, TinyModel
from unirep.losses.bundle import LossBundle
from unirep.weighting import Weighting, build_weighting

TASKS3 = ["a", "b", "c"]
LR = 0.05


def model(tasks: list[str], dtype: torch.dtype = torch.float64) -> TinyModel:
    torch.manual_seed(0)
    return TinyModel(tasks).to(dtype)


def batch(step: int, tasks: list[str], dtype: torch.dtype = torch.float64) -> tuple[Tensor, dict]:
    """Inputs and partly conflicting targets of step ``step``."""
    gen = torch.Generator().manual_seed(10 + step)
    x = torch.randn(6, 4, generator=gen).to(dtype)
    base = torch.randn(6, generator=gen).to(dtype)
    targets = {
        t: (-1.0) ** i * (i + 1.0) * base + torch.randn(6, generator=gen).to(dtype)
        for i, t in enumerate(tasks)
    }
    return x, targets


def losses(net: TinyModel, x: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
    out = net(x)
    return {t: ((out[t] - y) ** 2).mean() for t, y in targets.items()}


def shared(net: TinyModel) -> list[nn.Parameter]:
    return list(net.trunk.parameters())


def flat(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def heads(net: TinyModel) -> Tensor:
    return flat(list(net.heads.parameters()))


def jacobian(net: TinyModel, task_losses: list[Tensor]) -> Tensor:
    """``[T, n]``: each loss's gradient of the trunk, one autograd call each."""
    rows = []
    for loss in task_losses:
        grads = torch.autograd.grad(loss, shared(net), retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def sgd_(net: nn.Module) -> None:
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    net.zero_grad()


ReferenceStep = Callable[[Tensor, Tensor], Tensor]
"""``(J [T, n], losses [T]) -> shared gradient [n]``, the reference's state in a closure."""


def run_ours(weighting: Weighting, tasks: list[str], steps: int) -> list[tuple[Tensor, Tensor]]:
    """``(shared grad, head grads)`` of each of ``steps`` SGD steps taken with ``weighting``."""
    net = model(tasks)
    net.weighting = weighting
    out = []
    for step in range(steps):
        x, targets = batch(step, tasks)
        bundle = LossBundle(supervised=losses(net, x, targets))
        weighting.backward(bundle, shared(net), FakeAccelerator())
        out.append((flat(shared(net)).clone(), heads(net).clone()))
        sgd_(net)
        weighting.after_step({}, FakeAccelerator())
    return out


def run_reference(
    reference: ReferenceStep,
    tasks: list[str],
    steps: int,
    transform: Callable[[Tensor], Tensor] = lambda loss: loss,
) -> list[tuple[Tensor, Tensor]]:
    """The same steps, the shared gradient from ``reference`` on the naive Jacobian of the
    transformed losses, the heads from the backward of their (transformed) sum."""
    net = model(tasks)
    out = []
    for step in range(steps):
        x, targets = batch(step, tasks)
        raw_losses = list(losses(net, x, targets).values())
        task_losses = [transform(loss) for loss in raw_losses]
        raw = torch.stack([loss.detach() for loss in raw_losses])
        jac = jacobian(net, task_losses)
        sum(task_losses).backward()
        direction = reference(jac, raw)
        out.append((direction, heads(net).clone()))
        offset = 0
        for p in shared(net):
            p.grad = direction[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        sgd_(net)
    return out


def steps_from(
    name: str, weighting: Weighting, tasks: list[str], steps: range
) -> list[tuple[Tensor, Tensor]]:
    """Steps ``steps`` of :func:`run_ours` taken by ``weighting``, from the parameters the run
    had before them (replayed with a fresh ``name`` weighting)."""
    net = model(tasks)
    earlier = build_weighting(name, tasks)
    for step in range(steps.start):
        x, targets = batch(step, tasks)
        earlier.backward(LossBundle(supervised=losses(net, x, targets)), shared(net),
                         FakeAccelerator())  # fmt: skip
        sgd_(net)
        earlier.after_step({}, FakeAccelerator())
    out = []
    for step in steps:
        x, targets = batch(step, tasks)
        weighting.backward(LossBundle(supervised=losses(net, x, targets)), shared(net),
                           FakeAccelerator())  # fmt: skip
        out.append((flat(shared(net)).clone(), heads(net).clone()))
        sgd_(net)
        weighting.after_step({}, FakeAccelerator())
    return out


def check_resume(name: str, tasks: list[str]) -> None:
    """Two steps, the state loaded into a fresh weighting bound to the shared parameters (as a
    resumed run's trainable module), two more: bit for bit the four steps in a row."""
    straight = steps_from(name, build_weighting(name, tasks), tasks, range(4))
    first = build_weighting(name, tasks)
    steps_from(name, first, tasks, range(2))
    resumed = build_weighting(name, tasks)
    resumed.bind_shared(shared(model(tasks)))
    resumed.load_state_dict(first.state_dict())
    got = steps_from(name, resumed, tasks, range(2, 4))
    for (grad, head), (want, want_head) in zip(got, straight[2:], strict=True):
        assert torch.equal(grad, want) and torch.equal(head, want_head), name
    for key, value in first.state_dict().items():
        assert value.shape == resumed.state_dict()[key].shape, key
