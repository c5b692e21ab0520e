"""``moco`` against a port of LibMTL's ``MoCo.backward`` (the reference computation), over several
SGD steps of a tiny three-task model; state, absent tasks, accumulation, resume and refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tests.unit.weighting import tracking
from tests.unit.weighting.test_weighting import FakeAccelerator
from unirep.errors import ConfigError
from unirep.losses.bundle import LossBundle
from unirep.pipeline.validate import load_config
from unirep.weighting import build_weighting

TASKS = tracking.TASKS3


def libmtl_moco(
    num_tasks: int, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
    gamma_sigma: float = 0.5, rho: float = 0.0,
) -> tracking.ReferenceStep:  # fmt: skip
    """LibMTL ``MoCo`` (``init_param`` + ``backward``), ported line for line."""
    state: dict = {"step": 0, "y": None}

    def step(grads: Tensor, losses: Tensor) -> Tensor:
        state["step"] += 1
        grads = grads.clone()
        if state["y"] is None:
            state["y"] = torch.zeros_like(grads)
            state["lambd"] = torch.ones(num_tasks, dtype=grads.dtype) / num_tasks
        for tn in range(num_tasks):
            grads[tn] = grads[tn] / (grads[tn].norm() + 1e-8) * losses[tn]
        k = state["step"]
        state["y"] = state["y"] - (beta / k**beta_sigma) * (state["y"] - grads)
        y, lambd = state["y"], state["lambd"]
        eye = torch.eye(num_tasks, dtype=y.dtype)
        state["lambd"] = F.softmax(
            lambd - (gamma / k**gamma_sigma) * (y @ y.t() + rho * eye) @ lambd, -1
        )
        return state["y"].t() @ state["lambd"]

    return step


@pytest.mark.parametrize("kwargs", [{}, {"beta": 0.9, "beta_sigma": 0.0, "gamma": 0.5, "rho": 0.1}])
def test_moco_matches_libmtl_over_several_steps(kwargs: dict) -> None:
    weighting = build_weighting("moco", TASKS, **kwargs)
    ours = tracking.run_ours(weighting, TASKS, steps=5)
    reference = tracking.run_reference(libmtl_moco(3, **kwargs), TASKS, steps=5)
    for step, ((shared, heads), (want, want_heads)) in enumerate(zip(ours, reference, strict=True)):
        torch.testing.assert_close(shared, want, rtol=1e-10, atol=1e-12, msg=f"step {step}")
        torch.testing.assert_close(heads, want_heads, rtol=1e-10, atol=1e-12)  # the plain sum
    lambd = weighting.aggregator.lambd
    assert float(lambd.sum()) == pytest.approx(1.0)
    assert not torch.allclose(lambd, torch.full_like(lambd, 1 / 3))  # the weights moved


def test_moco_logs_its_weights_and_gradient_cosines() -> None:
    weighting = build_weighting("moco", TASKS)
    net = tracking.model(TASKS)
    x, targets = tracking.batch(0, TASKS)
    logs = weighting.backward(
        LossBundle(supervised=tracking.losses(net, x, targets)), tracking.shared(net),
        FakeAccelerator(),
    )  # fmt: skip
    lambd = weighting.aggregator.lambd.tolist()
    assert {k: v for k, v in logs.items() if k.startswith("weight/")} == {
        f"weight/{t}": w for t, w in zip(TASKS, lambd, strict=True)
    }
    assert "gradcos/a~b" in logs


def test_moco_accumulates_the_window_like_a_larger_batch() -> None:
    """Two micro-batches: one MoCo step on the window's mean gradient and mean loss."""
    weighting = build_weighting("moco", TASKS)
    net = tracking.model(TASKS)
    accelerator = FakeAccelerator(gradient_accumulation_steps=2)
    jacobians, raws = [], []
    for micro in range(2):
        x, targets = tracking.batch(micro, TASKS)
        task_losses = tracking.losses(net, x, targets)
        jacobians.append(tracking.jacobian(net, list(task_losses.values())))
        raws.append(torch.stack([v.detach() for v in task_losses.values()]))
        accelerator.sync_gradients = micro == 1
        weighting.backward(LossBundle(supervised=task_losses), tracking.shared(net), accelerator)
    want = libmtl_moco(3)(sum(jacobians) / 2, sum(raws) / 2)
    torch.testing.assert_close(tracking.flat(tracking.shared(net)), want, rtol=1e-10, atol=1e-12)
    assert int(weighting.aggregator.steps) == 1


def test_moco_leaves_an_absent_task_alone() -> None:
    weighting = build_weighting("moco", TASKS)
    tracking.run_ours(weighting, TASKS, steps=2)
    before_y = weighting.aggregator.tracked.clone()
    before = weighting.aggregator.lambd.clone()
    net = tracking.model(TASKS)
    x, targets = tracking.batch(3, TASKS)
    task_losses = tracking.losses(net, x, targets)
    del task_losses["b"]
    weighting.backward(LossBundle(supervised=task_losses), tracking.shared(net), FakeAccelerator())
    after = weighting.aggregator.lambd
    assert torch.equal(weighting.aggregator.tracked[1], before_y[1])
    assert after[1] == before[1]
    assert float(after.sum()) == pytest.approx(1.0)
    assert not torch.equal(after, before)


def test_moco_resumes_bit_exactly() -> None:
    tracking.check_resume("moco", TASKS)


def test_a_bound_moco_holds_state_shaped_like_the_shared_parameters() -> None:
    net = tracking.model(TASKS)
    weighting = build_weighting("moco", TASKS)
    assert weighting.state_dict()["aggregator.tracked"].shape == (3, 0)
    weighting.bind_shared(tracking.shared(net))
    assert weighting.state_dict()["aggregator.tracked"].shape == (3, 4 * 3 + 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [("{beta: x}", r"beta'?: must be a number"), ("{gamma: -1}", "gamma'?: must be"),
     ("{rho: .inf}", "rho'?: must be finite"), ("{lr: 1}", "lr")],
)  # fmt: skip
def test_moco_refuses_bad_arguments_naming_the_key(kwargs: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"weighting\.kwargs.*{message}"):
        load_config("mini-scenes", [f"weighting={{name: moco, kwargs: {kwargs}}}"])
