"""Weightings: how a :class:`~unirep.losses.bundle.LossBundle` becomes gradients.

Build one with ``build_weighting(name, tasks, **kwargs)`` (config ``weighting: {name, kwargs}``):

- ``sum`` (default): the plain sum, one backward (:class:`SumWeighting`);
- ``mean``: per-task losses averaged, joint terms added (:class:`MeanWeighting`);
- ``uncertainty``: learned log-variances, Kendall et al. 2018 (:class:`UncertaintyWeighting`);
- ``pcgrad``: gradient surgery on the shared parameters, Yu et al. 2020 (:class:`PCGrad`).
"""

from __future__ import annotations

from typing import Any

from unirep.weighting.base import WEIGHTINGS, LossWeighting, Weighting
from unirep.weighting.mean import MeanWeighting
from unirep.weighting.pcgrad import PCGrad
from unirep.weighting.sum import SumWeighting
from unirep.weighting.uncertainty import UncertaintyWeighting


def build_weighting(name: str, tasks: list[str], **kwargs: Any) -> Weighting:
    """The weighting registered as ``name`` for ``tasks`` (in the run's order)."""
    return WEIGHTINGS.build(name, tasks=list(tasks), **kwargs)


__all__ = [
    "WEIGHTINGS",
    "LossWeighting",
    "MeanWeighting",
    "PCGrad",
    "SumWeighting",
    "UncertaintyWeighting",
    "Weighting",
    "build_weighting",
]
