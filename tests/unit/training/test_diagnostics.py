"""Task-balance diagnostics: per-layer task dominance (AdaTask's rAU) and gradient cosines,
against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from unirep.losses.bundle import LossBundle
from unirep.training.diagnostics import TaskDiagnostics, shared_layers


class _Accelerator:
    num_processes = 1


class _Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(2, 2, bias=False)
        self.second = nn.Linear(2, 2)
        self.scale = nn.Parameter(torch.ones(()))  # a module-less 0-d parameter: no layer


def _setup() -> tuple[_Trunk, TaskDiagnostics, list[nn.Parameter]]:
    torch.manual_seed(0)
    trunk = _Trunk()
    named = list(trunk.named_parameters())
    return trunk, TaskDiagnostics(["a", "b"], named, every=2, beta=0.5), [p for _, p in named]


def test_layers_are_modules_owning_a_matrix() -> None:
    trunk = _Trunk()
    layers = shared_layers(list(trunk.named_parameters()))
    assert next(n for n, _ in trunk.named_parameters()) == "scale"  # own parameters come first
    assert layers == {"first": [1], "second": [2, 3]}


def _grads(g1a: Tensor, g2a: Tensor, g2b: Tensor) -> list[list[Tensor | None]]:
    """Task a reaches both layers; task b only the second (and neither reaches ``scale``)."""
    return [[None, g1a, g2a, torch.zeros(2)], [None, None, g2b, torch.ones(2)]]


def test_dominance_is_the_relative_ema_of_weighted_squared_steps_under_sgd() -> None:
    trunk, diag, shared = _setup()
    sgd = torch.optim.SGD(trunk.parameters(), lr=0.1)
    g1a, g2a, g2b = torch.ones(2, 2), torch.full((2, 2), 2.0), torch.full((2, 2), 1.0)
    logs = diag.measure(_grads(g1a, g2a, g2b), shared, {"weight/a": 0.5}, sgd)
    assert logs["dominance/first/a"] == 1.0 and logs["dominance/first/b"] == 0.0
    e_a, e_b = 0.25 * 16.0, 1.0 * (4.0 + 2.0)  # (w·g)² summed over the layer's parameters
    assert logs["dominance/second/a"] == pytest.approx(e_a / (e_a + e_b))
    # the second measurement is an EMA (β = 0.5) of the squared steps, then normalised
    logs = diag.measure(_grads(g1a, 0 * g2a, g2b), shared, {"weight/a": 0.5}, sgd)
    au_a, au_b = 0.5 * e_a + 0.5 * 0.0, 0.5 * e_b + 0.5 * e_b
    assert logs["dominance/second/a"] == pytest.approx(au_a / (au_a + au_b))
    flat_a = torch.cat([torch.zeros(1), g1a.flatten(), 0 * g2a.flatten(), torch.zeros(2)])
    flat_b = torch.cat([torch.zeros(1), torch.zeros(4), g2b.flatten(), torch.ones(2)])
    cos = float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm()))
    assert logs["gradcos/a~b"] == pytest.approx(cos)


def test_adam_steps_are_divided_by_the_optimizer_denominator() -> None:
    trunk, diag, shared = _setup()
    adam = torch.optim.Adam(trunk.parameters(), lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    for p in trunk.parameters():  # one step: v = (1 − β₂) g², so √v̂ = |g|
        p.grad = torch.full_like(p, 4.0)
    adam.step()
    g1a, g2a, g2b = torch.ones(2, 2), torch.full((2, 2), 2.0), torch.full((2, 2), 1.0)
    logs = diag.measure(_grads(g1a, g2a, g2b), shared, {}, adam)
    e_a = float(((g2a / (4.0 + 1e-8)) ** 2).sum())
    e_b = float(((g2b / (4.0 + 1e-8)) ** 2).sum() + ((torch.ones(2) / (4.0 + 1e-8)) ** 2).sum())
    assert logs["dominance/second/a"] == pytest.approx(e_a / (e_a + e_b))


def test_gradients_are_per_task_and_measurement_is_periodic() -> None:
    trunk, diag, shared = _setup()
    x = torch.randn(3, 2)
    z = trunk.second(trunk.first(x)) * trunk.scale
    bundle = LossBundle(supervised={"a": z[:, 0].pow(2).mean(), "b": z[:, 1].abs().mean()})
    grads = diag.gradients(bundle, shared, _Accelerator())
    expected = torch.autograd.grad(bundle.supervised["b"], shared, retain_graph=True)
    for got, want in zip(grads[1], expected, strict=True):
        torch.testing.assert_close(got, want)
    assert [diag.due(s) for s in range(4)] == [False, True, False, True]
    assert not TaskDiagnostics(["a"], list(trunk.named_parameters()), every=1).due(0)
