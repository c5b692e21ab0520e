"""``uncertainty``: homoscedastic-uncertainty weighting with one learnable log-variance per task.

Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry
and Semantics", CVPR 2018.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from unirep.losses.bundle import LossBundle
from unirep.weighting.base import WEIGHTINGS, LossWeighting


@WEIGHTINGS.register("uncertainty")
class UncertaintyWeighting(LossWeighting):
    """``L = Σ_{t in batch} [ exp(-s_t)·L_t + s_t ] + Σ_j J_j``, with ``s_t = log σ_t²`` learned.

    The form. The paper's Gaussian likelihood gives ``L_t/(2σ_t²) + log σ_t`` for regression and
    ``L_t/σ_t² + log σ_t`` for classification. Parametrised by the log-variance ``s_t = log σ_t²``
    (numerically stable, no positivity constraint), the regression form is
    ``½·exp(-s_t)·L_t + ½·s_t``, which is exactly what LibMTL's ``UW`` computes
    (``L/(2·e^s) + s/2``, initial ``s = -0.5``). We drop the common factor ½ and use one form for
    every task, ``exp(-s_t)·L_t + s_t``:

    - both forms have the same minimiser in ``s_t`` (``s_t* = log L_t``), hence the same relative
      task weights ``exp(-s_t)``; the ½ only rescales the task part of the objective;
    - without the ½, ``init = 0`` starts exactly at ``sum`` (every weight 1), so switching from the
      default changes nothing at step 0 and the joint terms keep their relative weight.

    The effective weight of task ``t`` (logged as ``weight/<t>``) is ``exp(-s_t)``.

    ``L_t`` is the task's total loss (:meth:`LossBundle.task_losses`: supervised plus its
    distillation terms); joint terms are added with weight 1. Only tasks present in the bundle
    contribute: adding ``s_t`` for an absent task would drive it to -∞ with nothing to balance it.

    State: ``log_var``, one 1-D ``nn.Parameter`` of shape ``[T]`` in the order of ``tasks`` (a
    single tensor rather than a ``ParameterDict`` so that DDP sees one parameter that always gets a
    gradient, even when a process's batch lacks some task). It is optimised by the run's optimizer
    and checkpointed with ``state_dict``.

    Args:
        tasks: task names, in the run's order.
        init: initial log-variance ``s_t`` of every task (0 → weight 1).

    Shapes: every loss term is a scalar; ``log_var`` is ``[T]``; the result is a scalar.

    Pitfall (see the paper and LibMTL issues): as a task's loss goes to 0, ``s_t → -∞`` and its
    weight ``exp(-s_t)`` grows without bound; the objective can become negative.
    """

    def __init__(self, tasks: list[str], init: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_var = nn.Parameter(torch.full((len(self.tasks),), float(init)))
        self._index = {task: i for i, task in enumerate(self.tasks)}

    def combine(self, bundle: LossBundle, accelerator: Any = None) -> Tensor:
        total: Tensor | None = None
        for task, loss in bundle.task_losses().items():
            if task not in self._index:
                raise KeyError(f"task {task!r} is not one of the weighting's tasks {self.tasks}")
            s = self.log_var[self._index[task]]
            term = torch.exp(-s) * loss + s
            total = term if total is None else total + term
        joint = bundle.joint_loss()
        if total is None:
            assert joint is not None, "empty LossBundle"
            return joint
        return total if joint is None else total + joint

    def weights(self) -> dict[str, float]:
        values = torch.exp(-self.log_var.detach()).tolist()
        return dict(zip(self.tasks, values, strict=True))
