"""Uncertainty weightings: learnable (log-)variances that scale the task losses.

- ``uncertainty``: homoscedastic-uncertainty weighting, one log-variance per task (Kendall, Gal &
  Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
  Semantics", CVPR 2018), in the exact form of LibMTL's and torchjd's ``UW``;
- ``restrained_uncertainty``: Dynamic Restrained Uncertainty Weighting, DRUW (Song et al.,
  arXiv 2206.11049, ExVo 2022): ``1/(Tσ²)`` weights, the positive regulariser ``log(1+σ²)`` and a
  restraint on ``Σ|σ|``, optionally plus per-iteration DWA weights;
- ``grouped_uncertainty``: Grouped Adaptive Loss Weighting, GALW (Tian et al., ACM MM 2022): one
  log-variance per group of tasks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from unirep.losses.bundle import LossBundle
from unirep.weighting.base import WEIGHTINGS, LossWeighting
from unirep.weighting.dwa import DWAWeighting
from unirep.weighting.loss_stats import add_terms, checked_task_losses, finite_float

_LOG_HALF = -math.log(2.0)


@WEIGHTINGS.register("uncertainty")
class UncertaintyWeighting(LossWeighting):
    """``L = Σ_{t in batch} [ ½·e^{-s_t}·L_t + ½·s_t ] + Σ_j J_j``, with ``s_t = log σ_t²`` learned.

    The form. The paper's Gaussian likelihood gives ``L_t/(2σ_t²) + log σ_t`` for regression.
    Parametrised by the log-variance ``s_t = log σ_t²`` (numerically stable, no positivity
    constraint) it is ``½·e^{-s_t}·L_t + ½·s_t``, used for every task, exactly as LibMTL's ``UW``
    (``L/(2·e^s) + s/2``) and torchjd's ``UW`` compute it: on a bundle with every task and no joint
    term, the value and the gradients are torchjd's ``UW`` for the same ``s``. The effective weight
    of task ``t`` (logged as ``weight/<t>``) is ``½·e^{-s_t}``.

    Initialisation. The default ``init = -log 2`` (-0.6931...) makes every starting weight exactly
    ``½·e^{log 2} = 1``, so switching from ``sum`` changes no gradient of the network at step 0
    (the value differs from ``sum`` by the constant ``½·Σ s_t``). ``init = -0.5`` reproduces LibMTL
    and ``lorenmt/mtan`` (starting weight ``½e^{0.5}`` ≈ 0.82); ``init = 0`` torchjd and nash-mtl
    (starting weight ½).

    ``L_t`` is the task's total loss (:meth:`LossBundle.task_losses`: supervised plus its
    distillation terms); joint terms are added with weight 1. Only tasks present in the bundle
    contribute: adding ``½ s_t`` for an absent task would drive it to -∞ with nothing to balance it.

    State: ``log_var``, one 1-D ``nn.Parameter`` of shape ``[T]`` in the order of ``tasks`` (a
    single tensor rather than a ``ParameterDict`` so that DDP sees one parameter that always gets a
    gradient, even when a process's batch lacks some task). It is optimised by the run's optimizer
    and checkpointed with ``state_dict``.

    Args:
        tasks: task names, in the run's order.
        init: initial log-variance ``s_t`` of every task (``-log 2`` → weight 1).

    Shapes: every loss term is a scalar; ``log_var`` is ``[T]``; the result is a scalar.

    Pitfall (see the paper and LibMTL issues): as a task's loss goes to 0, ``s_t → -∞`` and its
    weight ``½e^{-s_t}`` grows without bound; the objective can become negative.
    """

    def __init__(self, tasks: list[str], init: float = _LOG_HALF) -> None:
        super().__init__(tasks)
        self.log_var = nn.Parameter(torch.full((len(self.tasks),), finite_float("init", init)))
        self._index = {task: i for i, task in enumerate(self.tasks)}

    def combine(self, bundle: LossBundle, accelerator: Any = None) -> Tensor:
        terms = []
        for task, loss in checked_task_losses(bundle, self.tasks).items():
            s = self.log_var[self._index[task]]
            terms.append(0.5 * torch.exp(-s) * loss + 0.5 * s)
        return add_terms(terms, bundle.joint_loss())

    def weights(self) -> dict[str, float]:
        values = (0.5 * torch.exp(-self.log_var.detach())).tolist()
        return dict(zip(self.tasks, values, strict=True))


@WEIGHTINGS.register("restrained_uncertainty")
class RestrainedUncertaintyWeighting(LossWeighting):
    """DRUW: ``L = Σ_{t in batch} [(λ_t + 1/(T·σ_t²))·L_t + log(1+σ_t²)] + |φ − Σ_t|σ_t|| + ΣJ``.

    Song et al., "Dynamic Restrained Uncertainty Weighting Loss for Multitask Learning of Vocal
    Expression", arXiv 2206.11049 (authors' code ``Meishu619/dynamicrestraineduncertaintyloss``,
    ``revised_uncertaintyloss.py`` and ``revised_dwa_uncertaintyloss.py``).

    - ``σ_t`` is learned directly (the reference's ``log_vars`` is used as σ itself), initialised
      to ``init`` (default ``1/T``; the reference's 0.33 for its three tasks), so every starting
      weight ``1/(T·σ²)`` is ``T``. In the ``1/σ²`` term ``|σ_t|`` is clamped at ``1e-3`` from below
      (weight at most ``1e6/T``, no gradient through the clamp) so the weight cannot blow up.
    - ``log(1+σ_t²) ≥ 0`` is the positive regulariser (Liebel & Körner 2018), for present tasks.
    - The restraint ``|φ − Σ_t |σ_t||`` (``phi``, default 1) keeps ``Σ|σ|`` near φ over **all**
      tasks of the run, once per micro-batch; it bounds the weights and makes every σ get a
      gradient.
    - ``T`` is the number of tasks of the run (the reference hard-codes 3 as 0.33).
    - ``dwa=True`` adds ``λ_t``, the DWA weight of the reference's dynamic script:
      ``λ = T·softmax(w/temperature)`` with ``w_t = L̄_t(k−1)/L̄_t(k−2)`` from the two previous
      **optimizer steps** (``L̄`` = the step's process-averaged losses over its micro-batches;
      :class:`~unirep.weighting.dwa.DWAWeighting` with ``period=1``), ``temperature=10``, and
      ``λ = 1`` for the first two steps. Without it ``λ_t = 0``.

    Fixes to the released script: σ is an ``nn.Parameter`` trained by the run's optimizer (the
    script never gives it to the optimizer, so its uncertainty part is a frozen constant), and the
    UW and DWA weights use the same task order (the run's).

    Absent tasks contribute no loss and no ``log(1+σ²)`` term (it would shrink their σ with nothing
    to balance it); only the restraint moves their σ. Joint terms are added with weight 1.

    State: ``sigma`` (``nn.Parameter`` ``[T]``, trained by the run's optimizer) and, with
    ``dwa=True``, the DWA statistics (buffers of the ``dwa`` submodule).

    Args:
        tasks: task names, in the run's order.
        init: initial σ of every task (default ``1/T``).
        phi: the target of ``Σ_t |σ_t|`` in the restraint.
        dwa: add the per-step DWA weights.
        temperature: DWA temperature (used with ``dwa=True``).

    Shapes: every loss term is a scalar; ``sigma`` is ``[T]``; the result is a scalar.
    """

    min_sigma = 1e-3

    def __init__(
        self,
        tasks: list[str],
        init: float | None = None,
        phi: float = 1.0,
        dwa: bool = False,
        temperature: float = 10.0,
    ) -> None:
        super().__init__(tasks)
        count = len(self.tasks)
        init = 1.0 / count if init is None else finite_float("init", init)
        if abs(init) < self.min_sigma:
            raise ValueError(f"init (initial σ) must have |init| >= {self.min_sigma}, got {init}")
        if not isinstance(dwa, bool):
            raise ValueError(f"dwa must be true or false, got {dwa!r}")
        self.phi = finite_float("phi", phi)
        self.sigma = nn.Parameter(torch.full((count,), init))
        self.dwa = DWAWeighting(tasks, temperature=temperature, period=1) if dwa else None
        self._index = {task: i for i, task in enumerate(self.tasks)}

    def _inverse(self) -> Tensor:
        """``1/(T·σ²)`` with ``|σ|`` clamped at ``min_sigma``, ``[T]``."""
        clamped = self.sigma.abs().clamp_min(self.min_sigma)
        return 1.0 / (len(self.tasks) * clamped**2)

    def combine(self, bundle: LossBundle, accelerator: Any = None) -> Tensor:
        losses = checked_task_losses(bundle, self.tasks)
        inverse = self._inverse()
        lambdas = None
        if self.dwa is not None:
            self.dwa.observe(losses, accelerator)
            lambdas = self.dwa.lambdas
        terms = []
        for task, loss in losses.items():
            i = self._index[task]
            weight = inverse[i] if lambdas is None else lambdas[i] + inverse[i]
            terms.append(weight * loss + torch.log1p(self.sigma[i] ** 2))
        terms.append((self.phi - self.sigma.abs().sum()).abs())
        return add_terms(terms, bundle.joint_loss())

    def after_step(self, task_losses: dict[str, Tensor], accelerator: Any) -> None:
        if self.dwa is not None:
            self.dwa.after_step(task_losses, accelerator)

    def weights(self) -> dict[str, float]:
        weights = self._inverse().detach()
        if self.dwa is not None:
            weights = weights + self.dwa.lambdas
        return dict(zip(self.tasks, weights.tolist(), strict=True))


@WEIGHTINGS.register("grouped_uncertainty")
class GroupedUncertaintyWeighting(LossWeighting):
    """GALW: ``L = Σ_{g with a task in batch} [½·e^{-s_g}·Σ_{t∈g in batch} L_t + ½·s_g] + Σ_j J_j``.

    Tian et al., "Grouped Adaptive Loss Weighting for Person Search", ACM MM 2022. Tasks
    that converge at similar rates share one learnable log-variance ``s_g`` (Kendall form per group,
    the same form and initialisation as ``uncertainty``); the groups are fixed in advance (the paper
    groups by the convergence curves of a baseline run). No reference code was found: this is
    grouped ``uncertainty``; with every task in its own group it is ``uncertainty``.

    Groups: ``groups`` lists groups of task names; every task of the run is in at most one listed
    group, and tasks not listed each form their own group (after the listed groups, in task order).
    ``s_g`` enters only when the group has a task in the bundle (else nothing would balance it).
    The weight of task ``t`` (logged) is ``½·e^{-s_{g(t)}}``. Joint terms are added with weight 1.

    State: ``log_var``, one ``nn.Parameter`` ``[G]`` in group order, trained by the run's
    optimizer.

    Args:
        tasks: task names, in the run's order.
        groups: ``[[task, ...], ...]``; unknown, duplicated or empty entries are a ValueError.
        init: initial ``s_g`` (``-log 2`` → weight 1).

    Shapes: every loss term is a scalar; ``log_var`` is ``[G]``; the result is a scalar.
    """

    def __init__(
        self, tasks: list[str], groups: list[list[str]] | None = None, init: float = _LOG_HALF
    ) -> None:
        super().__init__(tasks)
        self.groups = _check_groups(self.tasks, groups or [])
        self.log_var = nn.Parameter(torch.full((len(self.groups),), finite_float("init", init)))
        self._group_of = {task: g for g, members in enumerate(self.groups) for task in members}

    def combine(self, bundle: LossBundle, accelerator: Any = None) -> Tensor:
        by_group: dict[int, list[Tensor]] = {}
        for task, loss in checked_task_losses(bundle, self.tasks).items():
            by_group.setdefault(self._group_of[task], []).append(loss)
        terms = []
        for g, losses in sorted(by_group.items()):
            s = self.log_var[g]
            terms.append(0.5 * torch.exp(-s) * sum(losses[1:], losses[0]) + 0.5 * s)
        return add_terms(terms, bundle.joint_loss())

    def weights(self) -> dict[str, float]:
        values = (0.5 * torch.exp(-self.log_var.detach())).tolist()
        return {task: values[self._group_of[task]] for task in self.tasks}


def _check_groups(tasks: list[str], groups: Any) -> list[list[str]]:
    """The listed groups, then one group per task not listed; clear errors for bad entries."""
    if not isinstance(groups, list | tuple) or not all(isinstance(g, list | tuple) for g in groups):
        raise ValueError(f"groups must be a list of lists of task names, got {groups!r}")
    seen: set[str] = set()
    unknown, duplicated = [], []
    for group in groups:
        if not group:
            raise ValueError(f"groups must not hold an empty group, got {groups!r}")
        for task in group:
            if task not in tasks:
                unknown.append(task)
            elif task in seen:
                duplicated.append(task)
            seen.add(task)
    if unknown:
        raise ValueError(f"groups name unknown tasks {unknown}; valid tasks: {tasks}")
    if duplicated:
        raise ValueError(f"groups list tasks {duplicated} more than once; a task is in one group")
    listed = [list(g) for g in groups]
    return listed + [[t] for t in tasks if t not in seen]
