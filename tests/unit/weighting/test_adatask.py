"""AdaTask (Yang et al., AAAI 2023): the optimizer against torch's and a per-task reference, the
weighting that feeds it, its state, and the config rule that pairs them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from unirep.errors import ConfigError
from unirep.losses.bundle import LossBundle
from unirep.optim.optimizers import build_optimizer
from unirep.pipeline.validate import load_config
from unirep.weighting import AdaTask, build_weighting
from unirep.weighting.adatask import TASK_GRADS


class _Accelerator:
    num_processes = 1
    gradient_accumulation_steps = 1
    sync_gradients = True
    scaler = None

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def reduce(self, tensor: Tensor, reduction: str = "sum") -> Tensor:
        return tensor


def _grads(seed: int, steps: int, shape: tuple[int, ...] = (3, 2)) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (1 + i) for i in range(steps)]


@pytest.mark.parametrize(
    ("base", "reference"),
    [
        ("adam", lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), eps=1e-6)),
        ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-6)),
        ("adagrad", lambda p: torch.optim.Adagrad(p, lr=0.01, eps=1e-6)),
    ],
)
def test_a_parameter_without_task_gradients_gets_the_plain_torch_rule(base: str, reference) -> None:
    ours, theirs = nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(3, 2))
    opt = AdaTask([ours], base=base, lr=0.01, betas=(0.8, 0.95), eps=1e-6, alpha=0.9)
    ref = reference([theirs])
    for grad in _grads(0, 5):
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def _per_task_adam(
    grads: list[list[Tensor]], lr: float, b1: float, b2: float, eps: float
) -> Tensor:
    """θ after the steps, by the paper's Alg. 1 written out: one (m, v) per task, steps summed."""
    theta = torch.ones_like(grads[0][0])
    m = [torch.zeros_like(theta) for _ in grads[0]]
    v = [torch.zeros_like(theta) for _ in grads[0]]
    for t, step in enumerate(grads, start=1):
        update = torch.zeros_like(theta)
        for k, g in enumerate(step):
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            update += (m[k] / (1 - b1**t)) / ((v[k] / (1 - b2**t)).sqrt() + eps)
        theta = theta - lr * update
    return theta


def test_task_gradients_get_one_adam_accumulator_each() -> None:
    """Overlapping task gradients of very different scales: each task's step is normalised by
    its own second moment (the naive reference), not by the sum's (plain Adam)."""
    steps = [[g, 100 * h] for g, h in zip(_grads(1, 6), _grads(2, 6), strict=True)]
    p = nn.Parameter(torch.ones(3, 2))
    opt = AdaTask([p], base="adam", lr=0.01)
    for rows in steps:
        setattr(p, TASK_GRADS, torch.stack(rows))
        p.grad = sum(rows)
        opt.step()
        assert not hasattr(p, TASK_GRADS)  # consumed
    torch.testing.assert_close(p.detach(), _per_task_adam(steps, 0.01, 0.9, 0.999, 1e-8))
    plain = nn.Parameter(torch.ones(3, 2))
    adam = torch.optim.Adam([plain], lr=0.01)
    for rows in steps:
        plain.grad = sum(rows)
        adam.step()
    assert (plain - p).abs().max() > 1e-3  # not plain Adam on the sum


def test_disjoint_task_gradients_equal_one_adam_per_task() -> None:
    """The issue's check: when task a only moves θ[:2] and task b only θ[2:], AdaTask on θ is
    exactly Adam on each half with its own task's gradient."""
    p = nn.Parameter(torch.ones(4))
    halves = [nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))]
    opt = AdaTask([p], base="adam", lr=0.05)
    refs = [torch.optim.Adam([h], lr=0.05) for h in halves]
    for ga, gb in zip(_grads(3, 5, (2,)), _grads(4, 5, (2,)), strict=True):
        rows = torch.stack([torch.cat([ga, torch.zeros(2)]), torch.cat([torch.zeros(2), 7 * gb])])
        setattr(p, TASK_GRADS, rows)
        opt.step()
        for h, g, ref in zip(halves, (ga, 7 * gb), refs, strict=True):
            h.grad = g.clone()
            ref.step()
    torch.testing.assert_close(p.detach(), torch.cat([h.detach() for h in halves]))


@pytest.mark.parametrize("base", ["rmsprop", "adagrad"])
def test_rmsprop_and_adagrad_task_rules_by_hand(base: str) -> None:
    steps = [[g, 10 * h] for g, h in zip(_grads(5, 4), _grads(6, 4), strict=True)]
    p = nn.Parameter(torch.ones(3, 2))
    opt = AdaTask([p], base=base, lr=0.01, alpha=0.9, eps=1e-6)
    theta, acc = torch.ones(3, 2), [torch.zeros(3, 2), torch.zeros(3, 2)]
    for rows in steps:
        setattr(p, TASK_GRADS, torch.stack(rows))
        opt.step()
        update = torch.zeros(3, 2)
        for k, g in enumerate(rows):
            acc[k] = 0.9 * acc[k] + 0.1 * g * g if base == "rmsprop" else acc[k] + g * g
            update += g / (acc[k].sqrt() + 1e-6)
        theta = theta - 0.01 * update
    torch.testing.assert_close(p.detach(), theta)


def test_weight_decay_is_decoupled_and_applied_once() -> None:
    p = nn.Parameter(torch.full((2,), 2.0))
    opt = AdaTask([p], base="adam", lr=0.1, weight_decay=0.5)
    setattr(p, TASK_GRADS, torch.zeros(3, 2))  # no gradient: only the decay moves θ
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((2,), 2.0 * (1 - 0.1 * 0.5)))


def test_a_skipped_step_drops_the_task_gradients_and_bad_arguments_are_refused() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = AdaTask([p])
    setattr(p, TASK_GRADS, torch.ones(2, 2))
    opt.zero_grad()
    assert not hasattr(p, TASK_GRADS)
    with pytest.raises(ValueError, match="base must be"):
        AdaTask([p], base="sgd")
    with pytest.raises(ValueError, match="betas"):
        AdaTask([p], betas=[0.9])


class _TwoTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 3)
        self.heads = nn.ModuleDict({t: nn.Linear(3, 1) for t in ("a", "b")})

    def bundle(self, x: Tensor, y: Tensor) -> LossBundle:
        z = torch.tanh(self.trunk(x))
        out = {t: h(z).squeeze(-1) for t, h in self.heads.items()}
        return LossBundle(supervised={"a": ((out["a"] - y) ** 2).mean(),
                                      "b": ((out["b"] + 3 * y) ** 2).mean()})  # fmt: skip


def test_the_weighting_hands_each_task_gradient_to_the_optimizer_and_resumes() -> None:
    model, weighting = _TwoTask(), build_weighting("adatask", ["a", "b"])
    opt = build_optimizer("adatask", model.parameters(), {"lr": 0.01})
    x, y = torch.randn(6, 4), torch.randn(6)
    shared = list(model.trunk.parameters())
    bundle = model.bundle(x, y)
    rows = [torch.autograd.grad(bundle.supervised[t], shared, retain_graph=True) for t in "ab"]
    weighting.backward(bundle, shared, _Accelerator())
    for i, p in enumerate(shared):
        task_grads = getattr(p, TASK_GRADS)
        assert task_grads.shape == (3, *p.shape)  # a, b, then the (absent) joint terms
        torch.testing.assert_close(task_grads[0], rows[0][i])
        torch.testing.assert_close(task_grads[1], rows[1][i])
        assert not task_grads[2].any()
        torch.testing.assert_close(p.grad, rows[0][i] + rows[1][i])
    opt.step()
    opt.zero_grad()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(opt.state_dict())  # state_dict shares the moment tensors

    def run_step(m: _TwoTask, o: torch.optim.Optimizer) -> None:
        weighting.backward(m.bundle(x, y), list(m.trunk.parameters()), _Accelerator())
        o.step()
        o.zero_grad()

    run_step(model, opt)
    resumed = _TwoTask()
    resumed.load_state_dict(saved)
    again = build_optimizer("adatask", resumed.parameters(), {"lr": 0.01})
    again.load_state_dict(state)
    run_step(resumed, again)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_config_pairs_the_weighting_with_the_optimizer() -> None:
    with pytest.raises(ConfigError, match=r"train\.optim\.optimizer\.name.*adatask"):
        load_config("mini-scenes", ["weighting.name=adatask"])
    with pytest.raises(ConfigError, match=r"'weighting\.name'.*adatask"):
        load_config("mini-scenes", ["train.optim.optimizer={name: adatask}"])
    cfg = load_config(
        "mini-scenes",
        [
            "weighting.name=adatask",
            "train.optim.optimizer={name: adatask, kwargs: {base: rmsprop}}",
        ],
    )
    assert cfg.train.optim.optimizer.kwargs == {"base": "rmsprop"}
