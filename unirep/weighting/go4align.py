"""``go4align``: GO4Align (Shen, Wang, Xiao, van Noord & Worring, "GO4Align: Group Optimization for
Multi-Task Alignment", arXiv 2404.06486, 2024; the authors' ``autumn9999/GO4Align``
methods/cluster_methods.py ``GO4ALIGN``, and its copy in ``jianke0604/NTKMTL``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from unirep.losses.bundle import LossBundle
from unirep.weighting.base import WEIGHTINGS, LossWeighting
from unirep.weighting.loss_stats import (
    add_terms,
    checked_task_losses,
    finite_float,
    global_mean,
    loss_vector,
    positive_int,
)


def kmeans_1d(values: list[float], groups: int) -> list[float]:
    """Each value's cluster centre under the optimal ``groups``-means clustering of ``values``
    (1-D: the clusters are runs of the sorted values; exact, by dynamic programming over the
    within-cluster squared error, O(groups · k²)). Deterministic: ties go to the earliest split."""
    k = len(values)
    groups = max(1, min(groups, k))
    order = sorted(range(k), key=lambda i: (values[i], i))
    v = [values[i] for i in order]
    prefix, prefix_sq = [0.0], [0.0]
    for x in v:
        prefix.append(prefix[-1] + x)
        prefix_sq.append(prefix_sq[-1] + x * x)

    def cost(i: int, j: int) -> float:  # squared error of v[i:j] around its mean
        s = prefix[j] - prefix[i]
        return max(prefix_sq[j] - prefix_sq[i] - s * s / (j - i), 0.0)

    best = [[math.inf] * (k + 1) for _ in range(groups + 1)]
    cut = [[0] * (k + 1) for _ in range(groups + 1)]
    best[0][0] = 0.0
    for g in range(1, groups + 1):
        for j in range(g, k + 1):
            for i in range(g - 1, j):
                c = best[g - 1][i] + cost(i, j)
                if c < best[g][j] - 1e-15 * max(1.0, abs(c)):
                    best[g][j], cut[g][j] = c, i
    centres = [0.0] * k
    j = k
    for g in range(groups, 0, -1):
        i = cut[g][j]
        mean = (prefix[j] - prefix[i]) / (j - i)
        for position in range(i, j):
            centres[order[position]] = mean
        j = i
    return centres


@WEIGHTINGS.register("go4align")
class GO4AlignWeighting(LossWeighting):
    """``L = Σ_{t in batch} λ_t·L_t + Σ_j J_j`` with group weights ``λ`` from the current losses.

    Per call (a micro-batch), with ``L̄`` the task losses averaged over processes (detached), as the
    reference's ``get_weighted_loss``:

    1. risk-guided indicators: ``p ← p ⊙ exp(−η L̄)``, ``p ← p / Σp`` (``p₀ = 1/T``,
       ``η = robust_step_size``);
    2. ``ω_t = (Σ_s L̄_s / L̄_t) · p_t`` (the scale that equalises the tasks' losses);
    3. dynamical group assignment: the ``ω_t`` clustered into ``num_groups`` groups by K-means
       (1-D), ``λ_t`` = the centre of ``t``'s group (``num_groups = 1``: ``λ_t = mean(ω)``).

    Where this differs from the reference: the K-means is exact (:func:`kmeans_1d`, the optimal
    1-D clustering; the reference runs Lloyd's algorithm, ``kmeans_pytorch`` in the authors' file,
    whose import is commented out, or scikit-learn's with ``random_state=42`` in the NTKMTL copy:
    the same clusters whenever those find the optimum), so every process groups identically.
    With gradient accumulation ``p`` moves once per micro-batch (the reference has none). Tasks
    absent from every process (or with a non-finite loss) get ``λ = 0`` and keep their ``p``; the
    present ones are renormalised among themselves, keeping their share of ``Σp``.

    State (buffers, checkpointed, float64): ``probs`` (``p``, ``[T]``) and ``lambdas`` (``[T]``,
    the last weights, logged as ``weight/<t>``; ones before the first call). The losses are
    averaged over processes in float64.

    Args:
        tasks: task names, in the run's order.
        num_groups: K, at most the number of tasks (the authors' NYUv2 script's default is 1, its
            argument for the other benchmarks 5; the clustering needs K ≥ 2).
        robust_step_size: η (the reference's 1e-4).

    Shapes: every loss term is a scalar (losses must be positive); the result is a scalar.
    """

    probs: Tensor
    lambdas: Tensor

    def __init__(
        self, tasks: list[str], num_groups: int = 1, robust_step_size: float = 1e-4
    ) -> None:
        super().__init__(tasks)
        self.num_groups = positive_int("num_groups", num_groups)
        if self.num_groups > len(self.tasks):
            raise ValueError(
                f"num_groups must be at most the number of tasks ({len(self.tasks)}), "
                f"got {num_groups!r}"
            )
        self.robust_step_size = finite_float("robust_step_size", robust_step_size, low=0.0)
        count = len(self.tasks)
        self.register_buffer("probs", torch.full((count,), 1.0 / count, dtype=torch.float64))
        self.register_buffer("lambdas", torch.ones(count, dtype=torch.float64))
        self._index = {task: i for i, task in enumerate(self.tasks)}

    @torch.no_grad()
    def _update(self, mean: Tensor, known: Tensor) -> None:
        """``p`` and ``λ`` from the process-averaged losses ``mean`` of the ``known`` tasks."""
        index = known.nonzero().flatten().tolist()
        if not index:
            self.lambdas.zero_()
            return
        losses = mean.detach().to("cpu", torch.float64)[index]
        if bool((losses <= 0).any()):
            t = self.tasks[index[int((losses <= 0).nonzero()[0])]]
            raise ValueError(
                f"go4align weights each task by Σ L / L_t: task {t!r} has a loss "
                f"{float(losses.min()):.4g} <= 0; use positive losses or another weighting"
            )
        probs = self.probs.to("cpu")
        share = probs[index].sum()
        moved = probs[index] * torch.exp(-self.robust_step_size * losses)
        moved = (
            moved / moved.sum() if len(index) == len(self.tasks) else moved / moved.sum() * share
        )
        probs[index] = moved
        self.probs.copy_(probs)
        omega = (losses.sum() / losses) * moved
        if self.num_groups == 1:
            grouped = [float(omega.mean())] * len(index)
        else:
            grouped = kmeans_1d(omega.tolist(), self.num_groups)
        lambdas = torch.zeros(len(self.tasks), dtype=torch.float64)
        lambdas[index] = torch.tensor(grouped, dtype=torch.float64)
        self.lambdas.copy_(lambdas)

    def combine(self, bundle: LossBundle, accelerator: Any = None) -> Tensor:
        losses = checked_task_losses(bundle, self.tasks)
        values, present = loss_vector(losses, self.tasks, self.probs)
        mean, count, _ = global_mean(values, present, accelerator)
        self._update(mean, count > 0)
        terms = [self.lambdas[self._index[t]].to(loss) * loss for t, loss in losses.items()]
        return add_terms(terms, bundle.joint_loss())

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.lambdas.tolist(), strict=True))
