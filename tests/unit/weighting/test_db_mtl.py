"""``db_mtl`` against a port of LibMTL's ``DB_MTL.backward`` (the authors' reference computation),
over several SGD steps of a tiny three-task model; absent tasks, resume and refusals."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from tests.unit.weighting import tracking
from tests.unit.weighting.test_weighting import FakeAccelerator
from unirep.errors import ConfigError
from unirep.losses.bundle import LossBundle
from unirep.pipeline.validate import load_config
from unirep.weighting import build_weighting

TASKS = tracking.TASKS3


def libmtl_db_mtl(
    num_tasks: int, beta: float = 0.9, beta_sigma: float = 0.0
) -> tracking.ReferenceStep:
    """LibMTL ``DB_MTL`` (``init_param`` + ``backward``), ported line for line; its gradients are
    those of ``log(L_t + 1e-8)`` (the caller's ``transform``)."""
    state: dict = {"step": 0, "buffer": None}

    def step(batch_grads: Tensor, losses: Tensor) -> Tensor:
        state["step"] += 1
        if state["buffer"] is None:
            state["buffer"] = torch.zeros_like(batch_grads)
        k = state["step"]
        state["buffer"] = batch_grads + (beta / k**beta_sigma) * (state["buffer"] - batch_grads)
        u_grad = state["buffer"].norm(dim=-1)
        alpha = u_grad.max() / (u_grad + 1e-8)
        return sum(alpha[i] * state["buffer"][i] for i in range(num_tasks))

    return step


def _log(loss: Tensor) -> Tensor:
    return torch.log(loss + 1e-8)


@pytest.mark.parametrize("kwargs", [{}, {"beta": 0.5, "beta_sigma": 0.5}])
def test_db_mtl_matches_libmtl_over_several_steps(kwargs: dict) -> None:
    weighting = build_weighting("db_mtl", TASKS, **kwargs)
    ours = tracking.run_ours(weighting, TASKS, steps=5)
    reference = tracking.run_reference(libmtl_db_mtl(3, **kwargs), TASKS, steps=5, transform=_log)
    for step, ((shared, heads), (want, want_heads)) in enumerate(zip(ours, reference, strict=True)):
        torch.testing.assert_close(shared, want, rtol=1e-10, atol=1e-12, msg=f"step {step}")
        # the heads get the log-losses' gradients, as LibMTL's per-task backward passes
        torch.testing.assert_close(heads, want_heads, rtol=1e-10, atol=1e-12)
    alpha = weighting.aggregator.alpha
    assert float(alpha.min()) == pytest.approx(1.0)  # the largest EMA norm keeps weight 1
    assert int(weighting.aggregator.steps) == 5


def test_db_mtl_logs_its_weights() -> None:
    weighting = build_weighting("db_mtl", TASKS)
    net = tracking.model(TASKS)
    x, targets = tracking.batch(0, TASKS)
    bundle = LossBundle(supervised=tracking.losses(net, x, targets))
    logs = weighting.backward(bundle, tracking.shared(net), FakeAccelerator())
    assert [logs[f"weight/{t}"] for t in TASKS] == weighting.aggregator.alpha.tolist()


def test_db_mtl_leaves_an_absent_task_alone() -> None:
    weighting = build_weighting("db_mtl", TASKS)
    tracking.run_ours(weighting, TASKS, steps=2)
    before = weighting.aggregator.tracked.clone()
    net = tracking.model(TASKS)
    x, targets = tracking.batch(3, TASKS)
    task_losses = tracking.losses(net, x, targets)
    del task_losses["c"]
    weighting.backward(LossBundle(supervised=task_losses), tracking.shared(net), FakeAccelerator())
    after = weighting.aggregator.tracked
    assert torch.equal(after[2], before[2])
    assert not torch.equal(after[0], before[0])


def test_db_mtl_resumes_bit_exactly() -> None:
    tracking.check_resume("db_mtl", TASKS)


def test_db_mtl_refuses_a_negative_loss() -> None:
    weighting = build_weighting("db_mtl", TASKS)
    net = tracking.model(TASKS)
    x, targets = tracking.batch(0, TASKS)
    task_losses = tracking.losses(net, x, targets)
    task_losses["b"] = -task_losses["b"]
    with pytest.raises(ValueError, match="task 'b' has a negative loss"):
        weighting.backward(
            LossBundle(supervised=task_losses), tracking.shared(net), FakeAccelerator()
        )


@pytest.mark.parametrize(("kwargs", "message"), [("{beta: x}", "beta"), ("{sigma: 1}", "sigma")])
def test_db_mtl_refuses_bad_arguments_naming_the_key(kwargs: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"weighting\.kwargs.*{message}"):
        load_config("mini-scenes", [f"weighting={{name: db_mtl, kwargs: {kwargs}}}"])
