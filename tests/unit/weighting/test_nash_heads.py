"""Nash-MTL's heads against a port of the reference (AvivNavon/nash-mtl,
``methods/weight_methods.py``, ``NashMTL.get_weighted_loss`` and ``NashMTL.backward``): the
heads get ``Σ α_t L_t`` with the solved ``α``, the shared parameters ``αᵀJ`` clipped to norm
``max_norm``; four SGD steps of a tiny three-task model, every gradient compared, and the log's
``weight/<t>`` is the solved ``α`` (``shared_weight/<t>`` the clipped one). ``heads="sum"``
keeps unirep < 0.6's plain sum.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from tests.unit.weighting.test_weighting import FakeAccelerator
from unirep.losses.bundle import LossBundle
from unirep.weighting import build_weighting

cp = pytest.importorskip("cvxpy")
TASKS = ["a", "b", "c"]


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(5, 4)
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in TASKS})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = torch.tanh(self.trunk(x))
        return {t: h(z).squeeze(-1) for t, h in self.heads.items()}


def _batch(step: int) -> tuple[Tensor, dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(step)
    x, base = torch.randn(8, 5, generator=gen), torch.randn(8, generator=gen)
    return x, {"a": 3 * base, "b": -base + torch.randn(8, generator=gen), "c": base + 1}


def _losses(model: _Model, step: int) -> list[Tensor]:
    x, targets = _batch(step)
    out = model(x)
    return [((out[t] - targets[t]) ** 2).mean() for t in TASKS]


class _ReferenceNashMTL:
    """The reference's ``NashMTL`` (``update_weights_every=1``, ``optim_niter=20``,
    ``max_norm=1``), ported: its cvxpy problem, stop rule and backward."""

    def __init__(self, n: int, max_norm: float = 1.0, optim_niter: int = 20) -> None:
        self.n, self.max_norm, self.optim_niter = n, max_norm, optim_niter
        self.prvs_alpha = np.ones(n, dtype=np.float32)
        self.alpha_param = cp.Variable(shape=(n,), nonneg=True)
        self.prvs_alpha_param = cp.Parameter(shape=(n,), value=self.prvs_alpha)
        self.G_param = cp.Parameter(shape=(n, n), value=np.eye(n))
        self.normalization_factor_param = cp.Parameter(shape=(1,), value=np.array([1.0]))
        g_alpha = self.G_param @ self.alpha_param
        g_prvs = self.G_param @ self.prvs_alpha_param
        prvs_tag = 1 / self.prvs_alpha_param + (1 / g_prvs) @ self.G_param
        phi = prvs_tag @ (self.alpha_param - self.prvs_alpha_param)
        constraint = [
            -cp.log(self.alpha_param[i] * self.normalization_factor_param) - cp.log(g_alpha[i]) <= 0
            for i in range(n)
        ]
        objective = cp.Minimize(cp.sum(g_alpha) + phi / self.normalization_factor_param)
        self.prob = cp.Problem(objective, constraint)

    def _stop(self, gtg: np.ndarray, alpha_t: np.ndarray) -> bool:
        return bool(
            self.alpha_param.value is None
            or np.linalg.norm(gtg @ alpha_t - 1 / (alpha_t + 1e-10)) < 1e-3
            or np.linalg.norm(self.alpha_param.value - self.prvs_alpha_param.value) < 1e-6
        )

    def _solve(self, gtg: np.ndarray) -> np.ndarray:
        self.G_param.value = gtg
        self.normalization_factor_param.value = self.normalization_factor
        alpha_t = self.prvs_alpha
        for _ in range(self.optim_niter):
            self.alpha_param.value = alpha_t
            self.prvs_alpha_param.value = alpha_t
            try:
                self.prob.solve(solver=cp.ECOS, warm_start=True, max_iters=100)
            except Exception:  # the reference's bare except
                self.alpha_param.value = self.prvs_alpha_param.value
            if self._stop(gtg, alpha_t):
                break
            alpha_t = self.alpha_param.value
        if alpha_t is not None:
            self.prvs_alpha = alpha_t
        return self.prvs_alpha

    def backward(self, losses: list[Tensor], shared: list[nn.Parameter]) -> Tensor:
        grads = [
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in losses
        ]
        big_g = torch.stack(grads)
        gtg = big_g @ big_g.t()
        self.normalization_factor = torch.norm(gtg).detach().cpu().numpy().reshape((1,))
        gtg = gtg / self.normalization_factor.item()
        alpha = torch.from_numpy(self._solve(gtg.cpu().detach().numpy()))
        weighted_loss = sum(losses[i] * alpha[i] for i in range(len(alpha)))
        weighted_loss.backward()
        torch.nn.utils.clip_grad_norm_(shared, self.max_norm)
        return alpha


def _run(reference: bool, heads: str = "weighted", steps: int = 4) -> list[dict]:
    model = _Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method = _ReferenceNashMTL(len(TASKS)) if reference else build_weighting(
        "nash_mtl", TASKS, heads=heads, path="jacobian")  # fmt: skip
    out = []
    for step in range(steps):
        losses = _losses(model, step)
        shared = list(model.trunk.parameters())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not DPP.*")
            if reference:
                alpha = method.backward(losses, shared).tolist()  # type: ignore[union-attr]
                logs = {}
            else:
                bundle = LossBundle(supervised=dict(zip(TASKS, losses, strict=True)))
                logs = method.backward(bundle, shared, FakeAccelerator())  # type: ignore[union-attr]
                alpha = [logs[f"weight/{t}"] for t in TASKS]
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        out.append({"alpha": alpha, "grads": grads, "logs": logs})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return out


def test_heads_and_shared_gradients_follow_the_reference_over_steps() -> None:
    ours, ref = _run(False), _run(True)
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a["alpha"] == pytest.approx(b["alpha"], rel=1e-4), step
        for name, grad in b["grads"].items():
            torch.testing.assert_close(a["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                       msg=f"step {step} {name}")  # fmt: skip
        shared = [a["logs"][f"shared_weight/{t}"] for t in TASKS]
        assert sum(shared) <= sum(a["alpha"]) + 1e-9  # clipped: ≤ the solved α


def test_heads_sum_is_the_old_behaviour() -> None:
    ours, ref = _run(False, heads="sum", steps=1), _run(True, steps=1)
    model = _Model()
    sum(_losses(model, 0)).backward()  # type: ignore[union-attr]
    losses_grad = {n: p.grad for n, p in model.heads.named_parameters()}
    for name, grad in losses_grad.items():
        torch.testing.assert_close(ours[0]["grads"][f"heads.{name}"], grad)
    torch.testing.assert_close(ours[0]["grads"]["trunk.weight"], ref[0]["grads"]["trunk.weight"],
                               rtol=1e-4, atol=1e-6)  # fmt: skip


def test_bad_heads_value_is_refused() -> None:
    with pytest.raises(ValueError, match="heads must be 'sum' or 'weighted'"):
        build_weighting("nash_mtl", TASKS, heads="alpha")
