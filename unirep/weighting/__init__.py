"""Weightings: how a :class:`~unirep.losses.bundle.LossBundle` becomes gradients.

Build one with ``build_weighting(name, tasks, **kwargs)`` (config ``weighting: {name, kwargs}``).

Loss weightings (one backward): ``sum`` (default), ``mean``, ``static`` (fixed per-task weights),
``uncertainty`` (Kendall et al. 2018), ``restrained_uncertainty`` (DRUW, Song et al. 2022),
``grouped_uncertainty`` (GALW, Tian et al. 2022), ``dwa`` (Liu et al. 2019), ``rlw`` (Lin et al.
2022), ``famo`` (Liu et al. 2023), ``go4align`` (Shen et al. 2024), ``imtl`` with ``mode="l"``;
``gradnorm`` (Chen et al. 2018: one backward plus the gradient norms on the last shared layer).

Gradient methods (:class:`GradientWeighting`, per-task gradients averaged over processes before
they are combined): ``mgda``, ``mgda_ub``, ``pcgrad``, ``cagrad``, ``imtl`` (``g`` / ``h``),
``nash_mtl``, ``aligned_mtl``, ``upgrad``, ``ntkmtl`` (Qin et al. 2025), ``moco`` (Fernando
et al. 2023) and ``db_mtl`` (Lin et al. 2023: state shaped like the shared parameters,
:mod:`unirep.weighting.tracked`), and ``adatask`` (with the ``adatask`` optimizer:
task-wise second moments on the shared parameters); torchjd's ``gradvac``, ``graddrop``,
``fairgrad``, ``modo``, ``sdmgrad``, ``dualproj``, ``excess_mtl``, ``krum``, ``trimmed_mean``,
``config``, ``pcd``, ``cr_mogm`` (:mod:`unirep.weighting.torchjd_methods`); loss
scalarizations ``gls`` and ``stch`` (:mod:`unirep.weighting.scalarizations`). Their
combination rules are :mod:`unirep.weighting.aggregators`; :func:`aggregate` applies one to a
``[T, P]`` Jacobian.

Update schedules: ``alternating`` (Pascal et al. 2021): one optimizer step per random task group
on every batch.
"""

from __future__ import annotations

from typing import Any

from unirep.weighting.adatask import AdaTask
from unirep.weighting.aggregators import AGGREGATORS, Aggregator, aggregate, build_aggregator
from unirep.weighting.alternating import AlternatingWeighting
from unirep.weighting.base import WEIGHTINGS, LossWeighting, Weighting, process_mean
from unirep.weighting.db_mtl import DBMTLWeighting
from unirep.weighting.dwa import DWAWeighting
from unirep.weighting.famo import FAMOWeighting
from unirep.weighting.go4align import GO4AlignWeighting
from unirep.weighting.gradient import GradientWeighting
from unirep.weighting.gradnorm import GradNormWeighting
from unirep.weighting.mean import MeanWeighting
from unirep.weighting.moco import MoCoAggregator
from unirep.weighting.ntkmtl import NTKMTLAggregator
from unirep.weighting.rlw import RLWWeighting
from unirep.weighting.scalarizations import GLSWeighting, STCHWeighting
from unirep.weighting.static import StaticWeighting
from unirep.weighting.sum import SumWeighting
from unirep.weighting.torchjd_methods import ExcessMTLWeighting
from unirep.weighting.uncertainty import (
    GroupedUncertaintyWeighting,
    RestrainedUncertaintyWeighting,
    UncertaintyWeighting,
)


def build_weighting(name: str, tasks: list[str], **kwargs: Any) -> Weighting:
    """The weighting registered as ``name`` for ``tasks`` (in the run's order)."""
    return WEIGHTINGS.build(name, tasks=list(tasks), **kwargs)


__all__ = [
    "AGGREGATORS",
    "WEIGHTINGS",
    "AdaTask",
    "Aggregator",
    "AlternatingWeighting",
    "DBMTLWeighting",
    "DWAWeighting",
    "ExcessMTLWeighting",
    "FAMOWeighting",
    "GLSWeighting",
    "GO4AlignWeighting",
    "GradNormWeighting",
    "GradientWeighting",
    "GroupedUncertaintyWeighting",
    "LossWeighting",
    "MeanWeighting",
    "MoCoAggregator",
    "NTKMTLAggregator",
    "RLWWeighting",
    "RestrainedUncertaintyWeighting",
    "STCHWeighting",
    "StaticWeighting",
    "SumWeighting",
    "UncertaintyWeighting",
    "Weighting",
    "aggregate",
    "build_aggregator",
    "build_weighting",
    "process_mean",
]
