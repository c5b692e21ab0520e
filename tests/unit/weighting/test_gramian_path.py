"""The Gramian path (torchjd's autogram engine, no ``[T, P]`` Jacobian) against the Jacobian path.

Every Gramian-only method on the tiny two-task model of ``test_weighting.py`` (joint and
distillation terms; an fp16-like loss scale in one case), three optimizer steps of SGD: the
logged weights, every parameter's gradient and the method's state equal the Jacobian path's;
``auto`` takes the Jacobian path on its first call, checks the engine's Gramian against ``J Jᵀ``
on the second, and then stays on the Gramian path; where the path cannot be exact (two
processes, accumulation, a method that reads ``J`` itself) ``auto`` keeps the Jacobian path and
``gramian`` refuses in one line naming the key.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from tests.unit.weighting.test_weighting import TASKS, FakeAccelerator, _data, _model, _rich_bundle
from unirep.weighting import GradientWeighting, build_weighting

GRAMIAN_METHODS = [
    "mgda",
    "pcgrad",
    "cagrad",
    "imtl",
    "nash_mtl",
    "aligned_mtl",
    "upgrad",
    "fairgrad",
    "modo",
    "sdmgrad",
    "dualproj",
    "pcd",
    "cr_mogm",
    "ntkmtl",
]


def _steps(name: str, path: str, steps: int = 3, scale: float | None = None) -> dict[str, Any]:
    """``steps`` SGD steps of the tiny model under ``name`` on ``path``; the trainable module's
    part (the engine made before each forward, its hooks removed after) done by hand."""
    model = _model()
    weighting = build_weighting(name, TASKS, seed=3, path=path)
    assert isinstance(weighting, GradientWeighting)
    accelerator = FakeAccelerator(scale=scale)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    logs, grads, routes = [], [], []
    for step in range(steps):
        x, targets = _data(seed=10 + step)
        engine = weighting.gramian_engine(model.trunk)
        bundle = _rich_bundle(model, x, targets)
        if engine is not None:
            engine.release()
        bundle.gramian_engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # Nash-MTL's solver on these tasks
            logs.append(weighting.backward(bundle, list(model.trunk.parameters()), accelerator))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        routes.append(weighting._route)
        if scale is not None:
            for p in model.parameters():
                p.grad /= scale
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"logs": logs, "grads": grads, "routes": routes, "state": weighting.state_dict()}


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_gramian_path_equals_the_jacobian_path(name: str) -> None:
    jacobian = _steps(name, "jacobian")
    gramian = _steps(name, "gramian")
    assert jacobian["routes"] == ["jacobian"] * 3
    assert gramian["routes"] == ["probe", "gramian", "gramian"]
    for step in range(3):
        for key, value in jacobian["logs"][step].items():
            assert gramian["logs"][step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        for pname, grad in jacobian["grads"][step].items():
            torch.testing.assert_close(gramian["grads"][step][pname], grad, rtol=1e-4, atol=1e-6,
                                       msg=f"{name} step {step} {pname}")  # fmt: skip
    assert int(jacobian["state"]["route_code"]) == 1 and int(gramian["state"]["route_code"]) == 2
    for key, value in jacobian["state"].items():
        if key != "route_code":  # the path each took, recorded for a resume
            torch.testing.assert_close(gramian["state"][key], value, rtol=1e-4, atol=1e-6)


def test_auto_is_the_gramian_path_and_the_loss_scale_is_undone() -> None:
    auto = _steps("upgrad", "auto", scale=1024.0)
    jacobian = _steps("upgrad", "jacobian", scale=1024.0)
    assert auto["routes"] == ["probe", "gramian", "gramian"]
    for pname, grad in jacobian["grads"][-1].items():
        torch.testing.assert_close(auto["grads"][-1][pname], grad, rtol=1e-4, atol=1e-4)


class _TwoProcesses(FakeAccelerator):
    num_processes = 2


@pytest.mark.parametrize(
    ("accelerator", "what"),
    [(_TwoProcesses(), "2 processes"), (FakeAccelerator(gradient_accumulation_steps=2), "2 acc")],
)
def test_auto_keeps_the_jacobian_path_where_the_gramian_path_is_not_exact(
    accelerator: FakeAccelerator, what: str
) -> None:
    model = _model()
    x, targets = _data()
    auto = build_weighting("mgda", TASKS, path="auto")
    auto.backward(_rich_bundle(model, x, targets), list(model.trunk.parameters()), accelerator)
    assert auto._route == "jacobian" and auto.gramian_engine(model.trunk) is None
    forced = build_weighting("mgda", TASKS, path="gramian")
    with pytest.raises(ValueError, match=f"'weighting.kwargs.path'.*{what}"):
        forced.backward(_rich_bundle(model, x, targets), list(model.trunk.parameters()),
                        accelerator)  # fmt: skip


@pytest.mark.parametrize(("name", "kwargs"), [("mgda_ub", {}), ("adatask", {})])
def test_gramian_path_refused_for_methods_that_need_more_than_the_gramian(
    name: str, kwargs: dict[str, Any]
) -> None:
    with pytest.raises((ValueError, TypeError), match="path"):
        build_weighting(name, TASKS, path="gramian", **kwargs)


def test_unknown_path_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="path must be one of auto, jacobian, gramian"):
        build_weighting("upgrad", TASKS, path="fast")


class _SideUse(nn.Module):
    """A trunk whose forward also uses a child's weight without calling the child: the engine
    cannot see that use."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + 0.5 * x @ self.inner.weight.T


def test_a_gramian_that_differs_falls_back_to_the_jacobian_path() -> None:
    model = _model()
    model.trunk = _SideUse()  # type: ignore[assignment]
    with pytest.warns(RuntimeWarning, match="differs"):
        routes = _steps_on(model, "auto")
    assert routes == ["probe", "jacobian", "jacobian"]
    with pytest.raises(RuntimeError, match=r"'weighting\.kwargs\.path'"):
        _steps_on(model, "gramian")


def _steps_on(model: nn.Module, path: str) -> list[str | None]:
    weighting = build_weighting("mgda", TASKS, path=path)
    routes = []
    for step in range(3):
        x, targets = _data(seed=step)
        engine = weighting.gramian_engine(model.trunk)
        bundle = _rich_bundle(model, x, targets)  # type: ignore[arg-type]
        if engine is not None:
            engine.release()
        bundle.gramian_engine = engine
        weighting.backward(bundle, list(model.trunk.parameters()), FakeAccelerator())
        routes.append(weighting._route)
        model.zero_grad()
    return routes


def test_config_refuses_the_gramian_path_with_accumulation_at_start_up() -> None:
    from unirep.errors import ConfigError
    from unirep.pipeline.validate import load_config

    with pytest.raises(ConfigError, match=r"'weighting\.kwargs\.path'.*accumulation"):
        load_config("mini-scenes", ["weighting={name: upgrad, kwargs: {path: gramian}}",
                                    "train.gradient_accumulation_steps=2"])  # fmt: skip
    cfg = load_config("mini-scenes", ["weighting={name: mgda, kwargs: {path: gramian}}"])
    assert cfg.weighting.kwargs["path"] == "gramian"
