"""``ntkmtl`` against a port of the authors' ``NTKMTL`` (``jianke0604/NTKMTL``
methods/weight_methods.py: ``ntkgrad``, ``overwrite_grad``'s ``× n_tasks`` and the shared
gradient clipped by ``clip_grad_norm_``), over several SGD steps; absent tasks and refusals."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tests.unit.weighting import tracking
from tests.unit.weighting.test_weighting import FakeAccelerator
from unirep.errors import ConfigError
from unirep.losses.bundle import LossBundle
from unirep.pipeline.validate import load_config
from unirep.weighting import aggregate, build_weighting

TASKS = tracking.TASKS3


def reference_ntkmtl(
    num_tasks: int, ntk_exp: float = 0.5, max_norm: float = 1.0
) -> tracking.ReferenceStep:
    """The authors' ``NTKMTL.get_weighted_loss`` (n = 1) and ``backward``, on ``grads [T, n]``."""

    def step(grads: Tensor, losses: Tensor) -> Tensor:
        gtg = grads @ grads.t()  # the reference's grads.t().mm(grads), grads being [n, T]
        w = torch.pow(torch.trace(gtg) / gtg.diagonal(), ntk_exp)
        new = (grads.t() @ w) * num_tasks  # overwrite_grad: "to match the sum loss"
        if max_norm > 0:
            holder = nn.Parameter(torch.zeros_like(new))
            holder.grad = new.clone()
            torch.nn.utils.clip_grad_norm_([holder], max_norm)
            new = holder.grad
        return new

    return step


@pytest.mark.parametrize("kwargs", [{}, {"ntk_exp": 0.75}, {"max_norm": 0.0}, {"max_norm": 50.0}])
def test_ntkmtl_matches_the_reference_over_several_steps(kwargs: dict) -> None:
    ours = tracking.run_ours(build_weighting("ntkmtl", TASKS, **kwargs), TASKS, steps=4)
    reference = tracking.run_reference(reference_ntkmtl(3, **kwargs), TASKS, steps=4)
    for step, ((shared, heads), (want, want_heads)) in enumerate(zip(ours, reference, strict=True)):
        torch.testing.assert_close(shared, want, rtol=1e-9, atol=1e-12, msg=f"step {step}")
        torch.testing.assert_close(heads, want_heads, rtol=1e-10, atol=1e-12)  # the plain sum


def test_ntkmtl_clips_and_balances() -> None:
    """Without clipping the weighted gradients have norms ∝ ‖g_t‖^(1−2e) (e = 0.5: equal); with it
    the combination's norm is at most max_norm."""
    jacobian = torch.tensor(
        [[3.0, 0.0, 1.0], [0.0, 0.5, 0.0], [0.1, 0.1, 0.2]], dtype=torch.float64
    )
    gram = jacobian @ jacobian.T
    weights = build_weighting("ntkmtl", TASKS, max_norm=0.0).aggregator(gram)
    scaled = (weights[:, None] * jacobian).norm(dim=1)
    torch.testing.assert_close(scaled, torch.full_like(scaled, float(scaled[0])))
    assert float(aggregate("ntkmtl", jacobian).norm()) == pytest.approx(1.0, rel=1e-5)


def test_ntkmtl_with_an_absent_task_uses_the_present_ones() -> None:
    weighting = build_weighting("ntkmtl", TASKS)
    net = tracking.model(TASKS)
    x, targets = tracking.batch(0, TASKS)
    task_losses = tracking.losses(net, x, targets)
    jac = tracking.jacobian(net, [task_losses["a"], task_losses["c"]])
    del task_losses["b"]
    logs = weighting.backward(
        LossBundle(supervised=task_losses), tracking.shared(net), FakeAccelerator()
    )
    assert logs["weight/b"] == 0.0
    want = reference_ntkmtl(2)(jac, torch.zeros(2))
    torch.testing.assert_close(tracking.flat(tracking.shared(net)), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"), [("{ntk_exp: -1}", "ntk_exp"), ("{max_norm: x}", "max_norm")]
)
def test_ntkmtl_refuses_bad_arguments_naming_the_key(kwargs: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"weighting\.kwargs.*{message}"):
        load_config("mini-scenes", [f"weighting={{name: ntkmtl, kwargs: {kwargs}}}"])
