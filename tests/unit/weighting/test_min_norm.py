"""MGDA's exact min-norm solver against two independent solutions of the QP.

``min_w∈Δ wᵀGw`` for 2–8 tasks on random and adversarial Jacobians (near-collinear, conflicting,
norms from 1e-3 to 1e3, rank 2, duplicated, opposed), against (1) an exhaustive enumeration of
the supports (each face's affine minimiser, kept when it lies in the simplex; the best one is
the optimum) and (2) quadprog's dual active-set QP; the direction within 1e-4 (relative) of both,
and no task's loss increasing to first order (``⟨d, g_t⟩ ≥ 0``) where the exact direction is not
zero. Then the config keys ``tolerance`` and ``max_iter``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.unit.weighting.test_weighting import TASKS
from unirep.config.binder import trial
from unirep.errors import ConfigError
from unirep.weighting import build_aggregator, build_weighting
from unirep.weighting.min_norm import min_norm_weights

KINDS = ["random", "near-collinear", "conflicting", "norms", "rank-2", "duplicate", "opposed"]


def _case(kind: str, tasks: int, seed: int) -> np.ndarray:
    """A ``[tasks, 20]`` float64 Jacobian of the given kind."""
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((tasks, 20))
    if kind == "near-collinear":
        jac = rng.standard_normal(20) + 1e-4 * jac
    elif kind == "conflicting":
        jac[1] = -jac[0] + 0.05 * rng.standard_normal(20)
    elif kind == "norms":
        jac *= np.logspace(-3, 3, tasks)[:, None]
    elif kind == "rank-2":
        jac = rng.standard_normal((tasks, 2)) @ rng.standard_normal((2, 20))
    elif kind == "duplicate":
        jac[-1] = jac[0]
    elif kind == "opposed":
        d = rng.standard_normal(20)
        jac -= 0.9 * np.outer(jac @ d / (d @ d), d)
        jac[0], jac[1] = d, -0.3 * d + 0.01 * rng.standard_normal(20)
    return jac


def _by_supports(jac: np.ndarray) -> np.ndarray:
    """The exact min-norm point: the least-norm affine minimiser, over every support, that lies
    in the simplex."""
    gram, tasks, best = jac @ jac.T, len(jac), None
    for size in range(1, tasks + 1):
        for support in itertools.combinations(range(tasks), size):
            idx = list(support)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size], kkt[:size, size], kkt[size, :size] = gram[np.ix_(idx, idx)], 1, 1
            rhs = np.zeros(size + 1)
            rhs[size] = 1
            alpha = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if abs(alpha.sum() - 1) > 1e-9 or (alpha < -1e-12).any():
                continue
            w = np.zeros(tasks)
            w[idx] = np.clip(alpha, 0, None) / np.clip(alpha, 0, None).sum()
            d = w @ jac
            if best is None or d @ d < best @ best:
                best = d
    assert best is not None
    return best


def _by_quadprog(jac: np.ndarray) -> np.ndarray:
    quadprog = pytest.importorskip("quadprog")
    gram, tasks = jac @ jac.T, len(jac)
    gram = gram + 1e-13 * np.trace(gram) * np.eye(tasks)  # quadprog needs it definite
    constraints = np.hstack([np.ones((tasks, 1)), np.eye(tasks)])
    bounds = np.hstack([1.0, np.zeros(tasks)])
    return quadprog.solve_qp(gram, np.zeros(tasks), constraints, bounds, meq=1)[0] @ jac


def _error(d: np.ndarray, exact: np.ndarray, jac: np.ndarray) -> float:
    """``‖d − d*‖ / ‖d*‖``, or over ``max_t ‖g_t‖`` where ``d* ≈ 0`` (0 in the hull)."""
    largest = float(np.linalg.norm(jac, axis=1).max())
    norm = float(np.linalg.norm(exact))
    return float(np.linalg.norm(d - exact)) / (norm if norm > 1e-6 * largest else largest)


def _increases_a_loss(d: np.ndarray, jac: np.ndarray) -> bool:
    """Some task's first-order change ``−⟨d, g_t⟩`` is an increase (cosine < −1e-8); a zero
    direction (at float64 precision) increases nothing."""
    norms, size = np.linalg.norm(jac, axis=1), float(np.linalg.norm(d))
    if size <= 1e-8 * norms.max():
        return False
    return bool(((jac @ d) / (norms * size) < -1e-8).any())


@pytest.mark.parametrize("kind", KINDS)
def test_exact_against_supports_and_quadprog(kind: str) -> None:
    for tasks in range(2, 9):
        for seed in range(2):
            jac = _case(kind, tasks, seed)
            weights, info = min_norm_weights(torch.from_numpy(jac @ jac.T))
            w = weights.numpy()
            assert info["converged"] == 1.0 and (w >= 0).all() and w.sum() == pytest.approx(1)
            d, exact = w @ jac, _by_supports(jac)
            assert _error(d, exact, jac) < 1e-4, (kind, tasks, seed)
            assert _error(d, _by_quadprog(jac), jac) < 1e-4, (kind, tasks, seed)
            assert not _increases_a_loss(d, jac) or _increases_a_loss(exact, jac)


def test_the_aggregator_uses_it_and_a_float32_gramian() -> None:
    jac = _case("conflicting", 4, 0)
    gram = torch.from_numpy(jac @ jac.T).float()
    weights = build_aggregator("mgda", 4)(gram)
    assert weights.dtype == torch.float32
    assert _error(weights.double().numpy() @ jac, _by_supports(jac), jac) < 1e-4


def test_one_task_and_zero_gradients() -> None:
    assert min_norm_weights(torch.ones(1, 1))[0].tolist() == [1.0]
    assert min_norm_weights(torch.zeros(3, 3))[0].sum() == pytest.approx(1.0)
    jac = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])  # a zero gradient: d* = 0
    w = min_norm_weights(torch.from_numpy(jac @ jac.T))[0].numpy()
    assert np.linalg.norm(w @ jac) < 1e-12


def test_max_iter_cap_warns() -> None:
    jac = _case("random", 8, 0)
    with pytest.warns(RuntimeWarning, match="max_iter=1"):
        build_aggregator("mgda", 8, max_iter=1)(torch.from_numpy(jac @ jac.T))


@pytest.mark.parametrize("name", ["mgda", "mgda_ub"])
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"tolerance": 0}, "tolerance"), ({"tolerance": "x"}, "tolerance"),
     ({"max_iter": 0}, "max_iter"), ({"max_iter": 2.5}, "max_iter")],
)  # fmt: skip
def test_bad_solver_keys_name_the_key(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"config key 'weighting.kwargs': mgda {message}"):
        trial("weighting.kwargs", lambda: build_weighting(name, TASKS, **kwargs))
