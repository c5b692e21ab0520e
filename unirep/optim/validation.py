"""The config rules the optimizers own: every recipe's optimizer and schedule named in their
registries with arguments their builders take, then built on a dummy parameter (torch's own
checks of lr, momentum, ...) and the schedule's factor checked along the recipe."""

from __future__ import annotations

import math

import torch
from torch import nn

from unirep.config.binder import bind_spec, trial
from unirep.config.schema import Config, OptimConfig
from unirep.errors import ConfigError
from unirep.optim.optimizers import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler


def check_config(cfg: Config) -> None:
    """Raise :class:`ConfigError`, naming the key, for an optimizer or schedule that cannot
    work in any recipe of the run (``train``, ``teachers.train``, the fine-tuned teachers')."""
    for prefix, recipe in cfg.recipes().items():
        for part in ("optim", "adapter_optim"):
            check_optim(f"{prefix}.{part}", getattr(recipe, part), recipe.max_steps)


def check_optim(prefix: str, optim: OptimConfig, total_steps: int) -> None:
    """Both specs' arguments, then a real optimizer and schedule on a dummy parameter."""
    bind_spec(OPTIMIZERS, optim.optimizer, f"{prefix}.optimizer", ("params",))
    bind_spec(SCHEDULES, optim.scheduler, f"{prefix}.scheduler", ("optimizer", "total_steps"))
    params = [nn.Parameter(torch.zeros(1))]
    spec, sched = optim.optimizer, optim.scheduler
    optimizer = trial(
        f"{prefix}.optimizer.kwargs", lambda: build_optimizer(spec.name, params, spec.kwargs)
    )
    schedule = trial(
        f"{prefix}.scheduler.kwargs",
        lambda: build_scheduler(sched.name, optimizer, total_steps, sched.kwargs),
    )
    for step in (0, total_steps // 2, total_steps):  # the schedule's factor stays a valid rate
        factors = [f(step) for f in schedule.lr_lambdas]
        if not all(math.isfinite(f) and f >= 0 for f in factors):
            raise ConfigError(
                f"config key '{prefix}.scheduler.kwargs': must be arguments giving a finite "
                f"learning-rate factor >= 0 (at step {step}: {factors}), got {sched.kwargs!r}"
            )
