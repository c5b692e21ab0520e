"""``mean``: the average of the per-task losses, plus the joint terms unweighted.

Equal weighting with 1/T, as LibMTL's ``EW`` averages and nash-mtl's baselines do. Under SGD this
is ``sum`` with a T× smaller learning rate on the task terms; Adam is nearly invariant to it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from unirep.losses.bundle import LossBundle
from unirep.weighting.base import WEIGHTINGS, LossWeighting


@WEIGHTINGS.register("mean")
class MeanWeighting(LossWeighting):
    """``L = (1/T) Σ_t L_t + Σ_j J_j`` with ``L_t`` from :meth:`LossBundle.task_losses`.

    ``T`` is the number of tasks of the phase (``len(tasks)``), not of the micro-batch, so every
    task keeps the same constant weight 1/T even when a batch carries only some of them.
    Shapes: every term is a scalar; the result is a scalar.
    """

    def combine(self, bundle: LossBundle, accelerator: Any = None) -> Tensor:
        total: Tensor | None = None
        for loss in bundle.task_losses().values():
            total = loss if total is None else total + loss
        joint = bundle.joint_loss()
        if total is None:  # a bundle with joint terms only
            assert joint is not None, "empty LossBundle"
            return joint
        total = total / len(self.tasks)
        return total if joint is None else total + joint

    def weights(self) -> dict[str, float]:
        return dict.fromkeys(self.tasks, 1.0 / len(self.tasks))
