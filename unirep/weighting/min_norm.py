"""The exact min-norm point of a convex hull, from the Gramian: MGDA's solver.

MGDA (Sener & Koltun, NeurIPS 2018) needs ``w* = argmin_{w ∈ Δ_T} wᵀ G w`` with ``G = J Jᵀ``
(``[T, T]``, ``J`` the ``[T, P]`` per-task gradients): ``d* = w*ᵀ J`` is the min-norm point of
the gradients' convex hull. The reference code solves it by Frank–Wolfe with a fixed stop
(``MinNormSolver``: 250 iterations, ``1e-5``; torchjd's ``MGDAWeighting``: ``1e-3``, 100),
which with 3–8 tasks and conflicting gradients can stop a few percent away from ``d*``, on a
direction that increases a task's loss.

:func:`min_norm_weights` is Wolfe's algorithm (P. Wolfe, "Finding the nearest point in a
polytope", Math. Programming 11, 1976) on the Gramian alone: an active-set method that keeps an
affinely independent *corral* ``S`` of gradients, moves to the point of least norm of their
affine hull (one ``[|S| + 1]`` linear solve) while it lies in their convex hull, and otherwise
steps back to the hull's boundary and drops the gradients whose weight reaches 0. It terminates
in finitely many steps at the exact optimum (up to rounding): its answer satisfies the
optimality conditions ``(G w)_t = ‖d‖²`` on the support and ``(G w)_t ≥ ‖d‖²`` elsewhere, so
``⟨d, g_t⟩ ≥ ‖d‖² ≥ 0`` for every task (no task's loss increases to first order).

Stop (the duality gap): with ``x = wᵀJ``, ``gap = ‖x‖² − min_t ⟨x, g_t⟩`` bounds the error,
``‖x − d*‖² ≤ f(w) − f(w*) ≤ 2 gap``; the solver stops when ``2 gap ≤ tolerance² ‖x‖²`` (the
direction within ``tolerance`` of ``d*``, relative) or ``2 gap ≤ 1e-14 max_t ‖g_t‖²`` (float64
rounding, reached when ``d* ≈ 0``: the gradients' hull contains 0), or after ``max_iter``
corral changes (then it returns its best feasible point and says so).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_GAP_FLOOR = 1e-14  # of max_t ‖g_t‖²: float64 rounding on a Gramian scaled to max diag 1


def min_norm_weights(
    gramian: Tensor, tolerance: float = 1e-6, max_iter: int = 1000
) -> tuple[Tensor, dict[str, float]]:
    """``w* = argmin_{w ∈ Δ_T} wᵀ G w`` for the Gramian ``G`` (``[T, T]``, symmetric PSD).

    Args:
        gramian: ``[T, T]``, any float dtype and device (solved in float64 on the CPU).
        tolerance: relative accuracy of the direction ``wᵀJ`` (see the module's stop rule).
        max_iter: most corral changes (each one ``[|S| + 1]`` linear solve).

    Returns:
        ``(w, info)``: ``w`` (``[T]``, ``≥ 0``, sums to 1; the Gramian's dtype and device) and
        ``info`` with ``gap`` (the final duality gap over ``max_t ‖g_t‖²``), ``iterations`` and
        ``converged`` (1.0 or 0.0).
    """
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square Gramian, got shape {list(gramian.shape)}")
    g = gramian.detach().to("cpu", torch.float64).numpy()
    w, info = _wolfe(0.5 * (g + g.T), float(tolerance), int(max_iter))
    return torch.from_numpy(w).to(device=gramian.device, dtype=gramian.dtype), info


def _wolfe(g: np.ndarray, tolerance: float, max_iter: int) -> tuple[np.ndarray, dict[str, float]]:
    n = g.shape[0]
    scale = float(np.max(np.diag(g))) if n else 0.0
    if n == 1 or not scale > 0 or not np.isfinite(scale):  # one task, or every gradient is 0
        return np.full(n, 1.0 / max(n, 1)), {"gap": 0.0, "iterations": 0.0, "converged": 1.0}
    g = g / scale
    start = int(np.argmin(np.diag(g)))
    support = [start]
    w = np.zeros(n)
    w[start] = 1.0
    gap, iterations, converged = np.inf, 0, False
    while iterations < max_iter and not converged:
        gw = g @ w
        norm2 = float(w @ gw)
        j = int(np.argmin(gw))
        gap = norm2 - float(gw[j])
        # j already in the corral, or dropped again at once (below): no descent left at float64
        # precision
        converged = 2 * gap <= max(tolerance**2 * norm2, _GAP_FLOOR) or j in support
        if converged:
            break
        support.append(j)
        while iterations < max_iter:  # Wolfe's minor cycle
            iterations += 1
            v = _affine_minimiser(g[np.ix_(support, support)])
            ws = w[support]
            if np.all(v > 0):
                w[support] = v
                break
            # step from w towards v until the first weight reaches 0; drop it (and any other)
            down = v <= 0
            theta = float(np.min(ws[down] / (ws[down] - v[down])))
            ws = np.clip(ws + theta * (v - ws), 0.0, None)
            ws[np.flatnonzero(down)[np.argmin(ws[down])]] = 0.0
            w[support] = ws
            kept = [s for s, weight in zip(support, ws, strict=True) if weight > 0]
            if theta <= 0 and j not in kept:
                support = kept
                converged = True
                break
            support = kept
            w /= w.sum()
    w = np.clip(w, 0.0, None)
    w /= w.sum()
    info = {"gap": float(max(gap, 0.0)), "iterations": float(iterations),
            "converged": float(converged)}  # fmt: skip
    return w, info


def _affine_minimiser(g: np.ndarray) -> np.ndarray:
    """``argmin_{Σα = 1} αᵀ g α`` (``g`` ``[k, k]``): the KKT system ``[[g, 1], [1ᵀ, 0]]``,
    by least squares (its minimum-norm solution where near-collinear gradients make it
    singular)."""
    k = g.shape[0]
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = g
    kkt[:k, k] = 1.0
    kkt[k, :k] = 1.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    alpha = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:k]
    return alpha / alpha.sum()
