"""Optimizers and learning-rate schedules, by name (schedule lengths are in optimizer steps)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from unirep.registry import Registry

OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")
SCHEDULES: Registry[Any] = Registry("scheduler")


@OPTIMIZERS.register("sgd")
def sgd(
    params: Iterable[nn.Parameter],
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD with momentum (the decathlon recipes)."""
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )


@OPTIMIZERS.register("adam")
def adam(
    params: Iterable[nn.Parameter], lr: float = 1e-3, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Adam (URL's adapter optimizer: lr 1e-2, weight decay 5e-4)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(
    params: Iterable[nn.Parameter], lr: float = 1e-3, weight_decay: float = 0.01
) -> torch.optim.Optimizer:
    """AdamW."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class _Cosine:
    """Linear warm-up, then cosine decay from 1 to ``min_factor`` at ``total`` steps."""

    def __init__(self, total: int, warmup_steps: int = 0, min_factor: float = 0.0) -> None:
        self.total, self.warmup, self.min_factor = total, warmup_steps, min_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class _MultiStep:
    """Multiply by ``gamma`` at each milestone (fractions of the run; URL: 80/120 and 100/120)."""

    def __init__(self, total: int, milestones: list[float], gamma: float = 0.1) -> None:
        self.steps = [round(m * total) if m < 1 else int(m) for m in milestones]
        self.gamma = gamma

    def __call__(self, step: int) -> float:
        return self.gamma ** sum(step >= s for s in self.steps)


class _Constant:
    def __call__(self, step: int) -> float:
        return 1.0


@SCHEDULES.register("cosine")
def cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_factor: float = 0.0,
) -> LambdaLR:
    """Cosine decay over the run, after an optional linear warm-up."""
    return LambdaLR(optimizer, _Cosine(total_steps, warmup_steps, min_factor))


@SCHEDULES.register("multistep")
def multistep(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    milestones: list[float] | None = None,
    gamma: float = 0.1,
) -> LambdaLR:
    """Step decay; milestones below 1 are fractions of the run (default URL's 2/3 and 5/6)."""
    return LambdaLR(optimizer, _MultiStep(total_steps, milestones or [2 / 3, 5 / 6], gamma))


@SCHEDULES.register("constant")
def constant(optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    """A constant learning rate."""
    return LambdaLR(optimizer, _Constant())


def build_optimizer(
    name: str, params: Iterable[nn.Parameter], kwargs: dict[str, Any]
) -> torch.optim.Optimizer:
    """An optimizer from the registry over ``params``."""
    return OPTIMIZERS.build(name, params=params, **kwargs)


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, total_steps: int, kwargs: dict[str, Any]
) -> LambdaLR:
    """A learning-rate schedule from the registry, ``total_steps`` long."""
    return SCHEDULES.build(name, optimizer=optimizer, total_steps=total_steps, **kwargs)
