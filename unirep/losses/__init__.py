"""Loss zoos: supervised task losses (:mod:`~unirep.losses.task`, per-pixel ones in
:mod:`~unirep.losses.dense`), distillation losses, feature and prediction
(:mod:`~unirep.losses.distillation`, InfoNCE in :mod:`~unirep.losses.contrastive`), the joint-space
losses for partial labels (MTPSL, JTR: :mod:`~unirep.losses.joint`), the cross-task consistency
terms (:mod:`~unirep.losses.transfer`) and the :class:`~unirep.losses.bundle.LossBundle` they fill.

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
