"""Loss zoos: supervised task losses and distillation losses (feature and prediction).

Each zoo is a :class:`~unirep.registry.Registry`; build a loss with e.g.
``FEATURE_LOSSES.build("cka_rbf", normalize=True)``.
"""

from unirep.losses import contrastive, dense  # noqa: F401  (register infonce, the dense losses)
from unirep.losses.distillation import (
    FEATURE_LOSSES,
    PREDICTION_LOSSES,
    KLDivergenceLoss,
    LinearCKALoss,
    NormalizedL2Loss,
    RBFCKALoss,
    linear_cka,
    rbf_cka,
)
from unirep.losses.task import TASK_LOSSES, CrossEntropyTaskLoss

__all__ = [
    "FEATURE_LOSSES",
    "PREDICTION_LOSSES",
    "TASK_LOSSES",
    "CrossEntropyTaskLoss",
    "KLDivergenceLoss",
    "LinearCKALoss",
    "NormalizedL2Loss",
    "RBFCKALoss",
    "linear_cka",
    "rbf_cka",
]
