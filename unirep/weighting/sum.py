"""``sum``: the plain sum of every loss term, one backward pass (the default).

Equal weighting / unitary scalarization: Kurin et al., "In Defense of the Unitary Scalarization
for Deep Multi-Task Learning", NeurIPS 2022, find it matches specialised multi-task optimizers
once properly regularised.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from unirep.losses.bundle import LossBundle
from unirep.weighting.base import WEIGHTINGS, LossWeighting


@WEIGHTINGS.register("sum")
class SumWeighting(LossWeighting):
    """``L = Σ_t L_t + Σ_j J_j``, weight 1 on every task, no 1/T.

    Returns :meth:`LossBundle.total` itself (same terms in the same floating-point order), so
    ``weighting: {name: sum}`` reproduces the numbers of the pre-bundle objective bit for bit.
    Shapes: every term is a scalar; the result is a scalar.
    """

    def combine(self, bundle: LossBundle, accelerator: Any = None) -> Tensor:
        return bundle.total()

    def weights(self) -> dict[str, float]:
        return dict.fromkeys(self.tasks, 1.0)
