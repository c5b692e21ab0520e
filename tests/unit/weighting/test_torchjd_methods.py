"""torchjd's methods as unirep weightings (issue 26): each against a port of its reference code
(LibMTL's weighting, the authors' code) on small inputs, over several steps for the stateful
ones; resumes bit-exact; absent tasks; config errors in one line naming the key."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from unirep.config.binder import trial
from unirep.errors import ConfigError
from unirep.losses.bundle import LossBundle
from unirep.weighting import WEIGHTINGS, build_aggregator, build_weighting

TASKS3 = ["a", "b", "c"]
GRADIENT = ["gradvac", "graddrop", "fairgrad", "modo", "sdmgrad", "dualproj", "excess_mtl",
            "krum", "trimmed_mean", "config", "pcd", "cr_mogm"]  # fmt: skip
STATEFUL = ["gradvac", "modo", "sdmgrad", "excess_mtl", "pcd", "cr_mogm"]


def _jacobians(steps: int, tasks: int = 3, n: int = 6, seed: int = 0) -> list[Tensor]:
    """Partly conflicting float64 task gradients, one ``[T, n]`` matrix per step."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen, dtype=torch.float64)
    return [
        torch.randn(tasks, n, generator=gen, dtype=torch.float64) + 0.5 * base for _ in range(steps)
    ]


def _seeded(call: Any, seed: int) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return call()


def _direction(aggregator: nn.Module, jacobian: Tensor, seed: int = 0) -> Tensor:
    """The update as GradientWeighting makes it (seeded like it)."""
    from unirep.weighting.aggregators import JacobianAggregator

    if isinstance(aggregator, JacobianAggregator):
        return _seeded(lambda: aggregator(jacobian), seed)
    return _seeded(lambda: aggregator(jacobian @ jacobian.T), seed) @ jacobian


# ---------------------------------------------------------------------------------------------
# Reference ports (LibMTL/LibMTL/weighting/<Method>.py unless said), written here


def _libmtl_gradvac(grads: Tensor, rho: Tensor, beta: float) -> Tensor:
    """LibMTL ``GradVac.backward`` (whole model), with ``torch.randperm`` orders for its
    ``random.shuffle`` ones (the same draws as torchjd's, from the same seed)."""
    pc = grads.clone()
    count = len(grads)
    for i in range(count):
        index = [j for j in range(count) if j != i]
        index = [index[k] for k in torch.randperm(len(index)).tolist()]
        for j in index:
            r = pc[i] @ grads[j] / (pc[i].norm() * grads[j].norm() + 1e-8)
            if r < rho[i, j]:
                w = pc[i].norm() * (rho[i, j] * (1 - r**2).sqrt() - r * (1 - rho[i, j] ** 2).sqrt())
                w = w / (grads[j].norm() * (1 - rho[i, j] ** 2).sqrt() + 1e-8)
                pc[i] += grads[j] * w
            rho[i, j] = (1 - beta) * rho[i, j] + beta * r
    return pc.sum(0)


def _libmtl_graddrop(grads: Tensor, leak: float) -> Tensor:
    """LibMTL ``GradDrop.backward``'s masking, on the rows themselves (no activation signs)."""
    p = 0.5 * (1 + grads.sum(0) / (grads.abs().sum(0) + 1e-7))
    u = torch.rand_like(p)
    mask = p.gt(u)[None] * grads.gt(0) + p.lt(u)[None] * grads.lt(0)
    return (grads * (leak + (1 - leak) * mask)).sum(0)


def _libmtl_fairgrad(grads: Tensor, alpha: float) -> Tensor:
    from scipy.optimize import least_squares

    a = (grads @ grads.T).numpy()
    count = len(grads)
    res = least_squares(lambda x: a @ x - np.power(1 / x, 1 / alpha), np.ones(count) / count,
                        bounds=(0, np.inf))  # fmt: skip
    return torch.from_numpy(res.x) @ grads


def _libmtl_simplex(y: Tensor) -> Tensor:
    """LibMTL ``MoDo._projection2simplex``."""
    m = len(y)
    sorted_y = torch.sort(y, descending=True)[0]
    tmpsum, tmax_f = 0.0, (torch.sum(y) - 1.0) / m
    for i in range(m - 1):
        tmpsum += sorted_y[i]
        tmax = (tmpsum - 1) / (i + 1.0)
        if tmax > sorted_y[i + 1]:
            tmax_f = tmax
            break
    return torch.max(y - tmax_f, torch.zeros(m, dtype=y.dtype))


def _libmtl_sdmgrad(grads: Tensor, w: Tensor, lamda: float, niter: int, lr: float) -> Tensor:
    """LibMTL ``SDMGrad.backward`` (ξ = ξ' = ζ: one batch), with the official code's ``lr``;
    updates ``w`` in place."""
    gg = grads @ grads.T
    diag = torch.where(gg.diagonal() < 0, torch.zeros_like(gg.diagonal()), gg.diagonal())
    gg = gg / (diag.sqrt().mean().pow(2) + 1e-8)
    gmean = gg.mean(dim=1)
    weights = w.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([weights], lr=lr, momentum=0.5)
    for _ in range(niter):
        optimizer.zero_grad()
        weights.grad = gg @ weights.detach() + lamda * gmean
        optimizer.step()
        with torch.no_grad():
            weights.copy_(_libmtl_simplex(weights.detach()))
    w.copy_(weights.detach())
    return (w @ grads + lamda * grads.mean(0)) / (1 + lamda)


class _LibMTLExcess:
    """LibMTL ``ExcessMTL.backward`` (= the official code's)."""

    def __init__(self, count: int, step: float) -> None:
        self.weight = torch.ones(count, dtype=torch.float64)
        self.grad_sum: Tensor | None = None
        self.initial: Tensor | None = None
        self.step = step

    def __call__(self, grads: Tensor) -> Tensor:
        if self.grad_sum is None:
            self.grad_sum = torch.zeros_like(grads)
        self.grad_sum += grads**2
        w = (grads**2 / torch.sqrt(self.grad_sum + 1e-7)).sum(1)
        if self.initial is None:
            self.initial = w
        else:
            self.weight = self.weight * torch.exp(w / self.initial * self.step)
            self.weight = self.weight / self.weight.sum() * len(grads)
        return self.weight @ grads


# ---------------------------------------------------------------------------------------------
# Against the references


def test_gradvac_follows_libmtl_over_steps() -> None:
    aggregator = build_aggregator("gradvac", 3, beta=0.5)
    rho = torch.zeros(3, 3, dtype=torch.float64)
    for step, jacobian in enumerate(_jacobians(4)):
        want = _seeded(lambda jacobian=jacobian: _libmtl_gradvac(jacobian, rho, 0.5), step)
        got = _direction(aggregator, jacobian, step)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(aggregator.phi, rho, rtol=1e-9, atol=1e-10)
    assert bool((rho != 0).any())


def test_graddrop_follows_libmtl_masking() -> None:
    aggregator = build_aggregator("graddrop", 3, leak=0.2)
    for step, jacobian in enumerate(_jacobians(3)):
        want = _seeded(lambda jacobian=jacobian: _libmtl_graddrop(jacobian, 0.2), step)
        torch.testing.assert_close(_direction(aggregator, jacobian, step), want)


def test_fairgrad_follows_libmtl() -> None:
    for alpha in (1.0, 2.0):
        aggregator = build_aggregator("fairgrad", 3, alpha=alpha)
        for jacobian in _jacobians(2, seed=3):
            torch.testing.assert_close(
                _direction(aggregator, jacobian), _libmtl_fairgrad(jacobian, alpha)
            )


def test_modo_follows_libmtl_over_steps() -> None:
    aggregator = build_aggregator("modo", 3, gamma=0.05, rho=0.1)
    lambd = torch.full((3,), 1 / 3, dtype=torch.float64)
    for jacobian in _jacobians(4, seed=4):
        gram = jacobian @ jacobian.T  # J₁J₂ᵀ with one batch: see docs/weighting.md
        lambd = _libmtl_simplex(lambd - 0.05 * (gram @ lambd + 0.1 * lambd))
        torch.testing.assert_close(_direction(aggregator, jacobian), lambd @ jacobian)
        torch.testing.assert_close(aggregator.state, lambd)


def test_sdmgrad_follows_libmtl_over_steps() -> None:
    aggregator = build_aggregator("sdmgrad", 3)
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    for jacobian in _jacobians(3, seed=5):
        want = _libmtl_sdmgrad(jacobian, w, lamda=0.3, niter=20, lr=10.0)
        torch.testing.assert_close(_direction(aggregator, jacobian), want)
        torch.testing.assert_close(aggregator.state, w)


def test_excess_mtl_follows_the_official_code_over_steps() -> None:
    aggregator = build_aggregator("excess_mtl", 3, robust_step_size=0.5)
    reference = _LibMTLExcess(3, 0.5)
    for jacobian in _jacobians(5, seed=6):
        want = reference(jacobian)
        torch.testing.assert_close(_direction(aggregator, jacobian), want)
        torch.testing.assert_close(aggregator.last_weights, reference.weight)


def _projection(target: Tensor, rows: Tensor, bounds: Tensor) -> Tensor:
    """``argmin_d ½‖d − target‖²`` s.t. ``rows @ d ≥ bounds``, by scipy's SLSQP."""
    from scipy.optimize import minimize

    t, a, b = target.numpy(), rows.numpy(), bounds.numpy()
    constraint = {"type": "ineq", "fun": lambda d: a @ d - b, "jac": lambda d: a}
    res = minimize(lambda d: 0.5 * ((d - t) ** 2).sum(), t, jac=lambda d: d - t,
                   constraints=[constraint], method="SLSQP",
                   options={"ftol": 1e-15, "maxiter": 1000})  # fmt: skip
    return torch.from_numpy(res.x)


def test_dualproj_is_the_projection_of_the_mean_onto_the_dual_cone() -> None:
    aggregator = build_aggregator("dualproj", 3)
    for jacobian in _jacobians(3, seed=7):
        jacobian = jacobian.clone()
        jacobian[2] = -jacobian[0] + 0.1 * jacobian[1]  # a conflict, so the projection bites
        want = _projection(jacobian.mean(0), jacobian, torch.zeros(3, dtype=jacobian.dtype))
        # torchjd's projector regularises the (trace-normalised) Gramian by 1e-4: that close
        torch.testing.assert_close(_direction(aggregator, jacobian), want, atol=1e-3, rtol=0)


def test_krum_selects_the_most_central_gradients() -> None:
    jacobian = _jacobians(1, tasks=5, seed=8)[0]
    for byzantine, selected in ((0, 1), (1, 2)):
        aggregator = build_aggregator("krum", 5, n_byzantine=byzantine, n_selected=selected)
        distances = torch.cdist(jacobian, jacobian)
        closest = 5 - byzantine - 2
        scores = torch.stack([d[d.argsort()[1 : closest + 1]].sum() for d in distances])
        want = jacobian[scores.argsort()[:selected]].mean(0)
        torch.testing.assert_close(_direction(aggregator, jacobian), want)


def test_trimmed_mean_is_coordinatewise() -> None:
    jacobian = _jacobians(1, tasks=5, seed=9)[0]
    aggregator = build_aggregator("trimmed_mean", 5, trim_number=1)
    want = jacobian.sort(dim=0).values[1:4].mean(0)
    torch.testing.assert_close(_direction(aggregator, jacobian), want)
    few = build_aggregator("trimmed_mean", 5, trim_number=2)  # 2 present: nothing trimmed
    present = torch.tensor([True, False, True, False, False])
    masked = jacobian * present[:, None]
    torch.testing.assert_close(few(masked, present), jacobian[present].mean(0))


def test_config_follows_the_official_formula() -> None:
    """``conflictfree``'s ConFIG_update: unit gradients, ``pinv @ ones``, normalised, length the
    sum of the projections."""
    aggregator = build_aggregator("config", 3)
    for jacobian in _jacobians(2, seed=10):
        units = jacobian / jacobian.norm(dim=1, keepdim=True)
        best = torch.linalg.pinv(units) @ torch.ones(3, dtype=jacobian.dtype)
        best = best / best.norm()
        want = (jacobian @ best).sum() * best
        torch.testing.assert_close(_direction(aggregator, jacobian), want)
        cosines = units @ want / want.norm()
        torch.testing.assert_close(cosines, cosines[0].expand(3))


def test_pcd_solves_its_quadratic_program() -> None:
    tau = 0.3
    aggregator = build_aggregator("pcd", 3, primary=1, tau=tau)
    jacobian = _jacobians(1, seed=11)[0]
    order = [1, 0, 2]  # the primary task first; first call: the EMA is the squared norm
    scaled = jacobian[order] / (jacobian[order].pow(2).sum(1, keepdim=True) + 1e-8).sqrt()
    want = _projection(scaled[0], scaled[1:], tau * scaled[1:].pow(2).sum(1))
    want = want * jacobian[1].norm() / want.norm()
    torch.testing.assert_close(_direction(aggregator, jacobian), want, atol=1e-5, rtol=1e-4)


def test_cr_mogm_smooths_the_base_weights() -> None:
    aggregator = build_aggregator("cr_mogm", 3, base="mgda", alpha=0.7)
    base = build_aggregator("mgda", 3)
    smoothed: Tensor | None = None
    for jacobian in _jacobians(4, seed=12):
        estimate = base(jacobian @ jacobian.T)
        smoothed = estimate if smoothed is None else 0.7 * smoothed + 0.3 * estimate
        torch.testing.assert_close(_direction(aggregator, jacobian), smoothed @ jacobian)


# ---------------------------------------------------------------------------------------------
# The loss scalarizations


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 3)
        self.heads = nn.ModuleDict({t: nn.Linear(3, 1) for t in TASKS3})

    def losses(self, seed: int) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.randn(6, 4, generator=gen), torch.randn(3, 6, generator=gen)
        z = torch.tanh(self.trunk(x))
        return {
            t: ((h(z).squeeze(-1) - y[i]) ** 2).mean()
            for i, (t, h) in enumerate(self.heads.items())
        }


def _grads(model: nn.Module) -> list[Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out


def test_gls_is_libmtls_geometric_mean() -> None:
    ours, ref = _Tiny(), _Tiny()
    weighting = build_weighting("gls", TASKS3)
    for seed in range(3):
        loss = weighting.combine(LossBundle(supervised=ours.losses(seed)))
        loss.backward()
        losses = torch.stack(list(ref.losses(seed).values()))
        want = torch.pow(losses.prod(), 1.0 / 3)  # LibMTL GLS.backward
        want.backward()
        torch.testing.assert_close(loss, want)
        for got, expected in zip(_grads(ours), _grads(ref), strict=True):
            torch.testing.assert_close(got, expected)
        effective = (want / (3 * losses)).detach().tolist()
        assert list(weighting.weights().values()) == pytest.approx(effective, rel=1e-5)


def test_stch_follows_libmtl_through_its_phases() -> None:
    """LibMTL ``STCH.backward`` with warm-up "epochs" of one step each: step 0 warms up, steps
    1–2 average the normalisation point, steps 3–5 are STCH."""
    mu = 0.5
    ours, ref = _Tiny(), _Tiny()
    weighting = build_weighting("stch", TASKS3, mu=mu, warmup_steps=1, nadir_steps=2)
    seen: list[Tensor] = []
    for step in range(6):
        loss = weighting.combine(LossBundle(supervised=ours.losses(step)))
        loss.backward()
        weighting.after_step({}, None)
        losses = torch.stack(list(ref.losses(step).values()))
        if step < 3:
            want = torch.log(losses + 1e-20).sum()
            if step >= 1:
                seen.append(losses.detach())
        else:
            nadir = torch.stack(seen).mean(0)
            logs = torch.log(losses / nadir + 1e-20)
            top = torch.max(logs.data).detach()
            want = mu * torch.log(torch.sum(torch.exp((logs - top) / mu))) * 3
            want = want + 3 * top  # LibMTL drops this constant (max-shift); the gradient is equal
        want.backward()
        torch.testing.assert_close(loss, want)
        for got, expected in zip(_grads(ours), _grads(ref), strict=True):
            torch.testing.assert_close(got, expected)
    torch.testing.assert_close(weighting.nadir, torch.stack(seen).mean(0).double())


# ---------------------------------------------------------------------------------------------
# Through GradientWeighting: resumes, absent tasks, configuration


class _FakeAccelerator:
    num_processes = 1
    gradient_accumulation_steps = 1
    sync_gradients = True
    scaler = None

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def reduce(self, tensor: Tensor, reduction: str = "sum") -> Tensor:
        return tensor


def _train(model: _Tiny, weighting: Any, steps: range, drop: str | None = None) -> list[Tensor]:
    """SGD steps with ``weighting``; the shared gradient of each step."""
    out = []
    for step in steps:
        losses = model.losses(step)
        if drop is not None and step % 2:
            losses.pop(drop)
        weighting.backward(LossBundle(supervised=losses), list(model.trunk.parameters()),
                           _FakeAccelerator())  # fmt: skip
        out.append(model.trunk.weight.grad.clone())
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
        model.zero_grad()
        weighting.after_step({}, _FakeAccelerator())
    return out


@pytest.mark.parametrize("name", [*STATEFUL, "gls", "stch"])
def test_resume_is_bit_exact(name: str) -> None:
    kwargs = {"warmup_steps": 1, "nadir_steps": 1} if name == "stch" else {}
    model, weighting = _Tiny(), build_weighting(name, TASKS3, **kwargs)
    straight = _train(model, weighting, range(4))
    model, weighting = _Tiny(), build_weighting(name, TASKS3, **kwargs)
    _train(model, weighting, range(2))
    saved = ({k: v.clone() for k, v in model.state_dict().items()},
             {k: v.clone() for k, v in weighting.state_dict().items()})  # fmt: skip
    model, weighting = _Tiny(), build_weighting(name, TASKS3, **kwargs)
    if hasattr(weighting, "bind_shared"):
        weighting.bind_shared(list(model.trunk.parameters()))
    model.load_state_dict(saved[0])
    weighting.load_state_dict(saved[1])
    resumed = _train(model, weighting, range(2, 4))
    for got, want in zip(resumed, straight[2:], strict=True):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("name", [*GRADIENT, "gls", "stch"])
def test_absent_tasks_train_and_get_no_weight(name: str) -> None:
    model, weighting = _Tiny(), build_weighting(name, TASKS3)
    grads = _train(model, weighting, range(4), drop="b")
    assert all(bool(torch.isfinite(g).all()) for g in grads), name
    for key, value in weighting.state_dict().items():
        if value.is_floating_point():
            assert bool(torch.isfinite(value).all()), (name, key)


def test_excess_mtl_logs_weights_and_state_fits_a_checkpoint() -> None:
    model, weighting = _Tiny(), build_weighting("excess_mtl", TASKS3)
    weighting.bind_shared(list(model.trunk.parameters()))
    assert weighting.aggregator.sq_grad_sum.shape == (3, 15)
    logs = weighting.backward(LossBundle(supervised=model.losses(0)),
                              list(model.trunk.parameters()), _FakeAccelerator())  # fmt: skip
    assert logs["weight/a"] == pytest.approx(1.0)  # the first call only records the baseline


@pytest.mark.parametrize(
    ("name", "kwargs", "key"),
    [
        ("gradvac", {"beta": 2}, "beta"),
        ("graddrop", {"leak": -1}, "leak"),
        ("fairgrad", {"alpha": -1}, "alpha"),
        ("modo", {"gamma": 0}, "gamma"),
        ("sdmgrad", {"momentum": 1.0}, "momentum"),
        ("excess_mtl", {"robust_step_size": 0}, "robust_step_size"),
        ("krum", {"n_byzantine": 1}, "n_byzantine"),
        ("trimmed_mean", {"trim_number": -1}, "trim_number"),
        ("pcd", {"primary": "z"}, "primary"),
        ("cr_mogm", {"alpha": 2}, "alpha"),
        ("cr_mogm", {"base": "graddrop"}, "base"),
        ("stch", {"mu": 0}, "mu"),
        ("stch", {"warmup_steps": -1}, "warmup_steps"),
        ("gradvac", {"betta": 0.5}, "betta"),
    ],
)
def test_bad_kwargs_are_one_line_naming_the_key(
    name: str, kwargs: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        trial("weighting.kwargs", lambda: WEIGHTINGS.build(name, tasks=TASKS3, **kwargs))
    message = str(info.value)
    assert "\n" not in message and key in message and "weighting.kwargs" in message, message


def test_every_new_method_is_registered() -> None:
    for name in [*GRADIENT, "gls", "stch"]:
        assert name in WEIGHTINGS, name
    random.seed(0)  # LibMTL's GradVac draws from `random`; ours never touches it
    state = random.getstate()
    _train(_Tiny(), build_weighting("gradvac", TASKS3), range(2))
    assert random.getstate() == state
