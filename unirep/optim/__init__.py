"""Optimizers and learning-rate schedules, by registry name."""

from unirep.optim.optimizers import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_scheduler"]
