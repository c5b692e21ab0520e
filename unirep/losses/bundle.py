"""What an objective returns: per-task losses with their graphs, for a weighting to combine.

An objective never mixes its terms into one number itself: it returns a :class:`LossBundle`, and
the phase's weighting (:mod:`unirep.weighting`) turns it into the update. ``sum`` reproduces the
plain sum; loss-based weightings rescale the per-task losses; gradient-based ones differentiate
each task's loss separately with respect to the shared parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class LossBundle:
    """Per-task and joint loss terms of one micro-batch, each a scalar that keeps its graph.

    Attributes:
        supervised: ``{task: loss}``, the task's supervised loss already multiplied by its
            configured weight (``dense.tasks.<t>.weight``; 1 for classification).
        distill: ``{task: {term: loss}}``, the distillation terms that belong to a task
            (``feature``, ``prediction``, ...), already multiplied by λ, σ/β and the annealing
            factor. A task of the run may have no entry (a teacher or the baseline).
        joint: ``{name: loss}``, terms that belong to no single task (cross-task consistency, a
            contrastive term over all tasks, ...).
        logs: detached scalars for the training log (``task/<t>``, ``feature/<t>``, ``anneal``).
        shared: the tensors the student's shared trunk returned in this forward (graphs kept),
            filled only for a weighting that asks for them (``mgda_ub``).
        gramian_engine: the trunk's Gramian engine of this forward
            (:class:`~unirep.weighting.gramian.TrunkGramian`), for a gradient weighting on the
            Gramian path; None otherwise.
    """

    supervised: dict[str, Tensor]
    distill: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    joint: dict[str, Tensor] = field(default_factory=dict)
    logs: dict[str, Tensor] = field(default_factory=dict)
    shared: list[Tensor] = field(default_factory=list)
    gramian_engine: Any = None

    @property
    def tasks(self) -> list[str]:
        """Task names in order: supervised tasks first, then any task with only distillation."""
        return list(dict.fromkeys([*self.supervised, *self.distill]))

    def task_losses(self) -> dict[str, Tensor]:
        """``{task: supervised + Σ its distillation terms}``: what a weighting balances."""
        out: dict[str, Tensor] = {}
        for task in self.tasks:
            total = self.supervised.get(task)
            for term in self.distill.get(task, {}).values():
                total = term if total is None else total + term
            assert total is not None
            out[task] = total
        return out

    def only(self, tasks: list[str], joint: bool = True) -> LossBundle:
        """The terms of ``tasks`` (and the joint terms when ``joint``); logs and ``shared`` kept."""
        keep = set(tasks)
        return LossBundle(
            supervised={t: v for t, v in self.supervised.items() if t in keep},
            distill={t: v for t, v in self.distill.items() if t in keep},
            joint=dict(self.joint) if joint else {},
            logs=self.logs,
            shared=self.shared,
            gramian_engine=self.gramian_engine,
        )

    def joint_loss(self) -> Tensor | None:
        """Σ of the joint terms, or None when there are none."""
        total: Tensor | None = None
        for term in self.joint.values():
            total = term if total is None else total + term
        return total

    def total(self) -> Tensor:
        """The plain sum: every supervised loss, then the distillation terms task by task
        (term by term), then the joint terms. This order is the pre-bundle objective's, so
        ``weighting=sum`` gives the same floating-point result."""
        device = next(iter([*self.supervised.values(), *self.joint.values()])).device
        total = torch.zeros((), device=device)
        for loss in self.supervised.values():
            total = total + loss
        for terms in self.distill.values():
            for loss in terms.values():
                total = total + loss
        for loss in self.joint.values():
            total = total + loss
        return total
