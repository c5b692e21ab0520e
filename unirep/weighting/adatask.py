"""AdaTask: task-wise adaptive learning rates on the shared parameters.

Yang, Li, Zhang, Cai, Sun & Shen, "AdaTask: A Task-Aware Adaptive Learning Rate Approach to
Multi-Task Learning", AAAI 2023 (reference code ``EnnengYang/AdaTask``, ``Adam_with_AdaTask``).
Ordinary multi-task Adam builds its second moment from the summed gradient, so the task with the
largest gradients sets every task's step size on the shared parameters; AdaTask keeps one
accumulator per task there.

Two halves, used together (``weighting: {name: adatask}`` and
``train.optim.optimizer: {name: adatask, kwargs: {base: adam, ...}}``; the config check refuses
one without the other):

- the weighting :func:`adatask` takes the per-task gradients of the shared parameters (averaged
  over processes, summed over the accumulation window) and hands them to the optimizer as
  ``param.task_grads`` (``[K, *param.shape]``: the T tasks, then the joint terms as one more
  "task"), writing their sum into ``.grad`` (what clipping and the non-finite check see);
- the optimizer :class:`AdaTask` updates a parameter that carries ``task_grads`` with one moment
  pair per row, and every other parameter (heads, adapters, weighting state) with the plain base
  rule on ``.grad``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from unirep.optim.optimizers import OPTIMIZERS
from unirep.weighting.aggregators import build_aggregator
from unirep.weighting.base import WEIGHTINGS, Weighting
from unirep.weighting.gradient import GradientWeighting

TASK_GRADS = "task_grads"
"""The attribute of a shared parameter holding its per-task gradients ``[K, *shape]``."""


class _AdaTaskWeighting(GradientWeighting):
    """The ``sum`` of the per-task gradients into ``.grad``, the gradients themselves into
    ``param.task_grads`` for :class:`AdaTask`."""

    def on_window(self, params: list[nn.Parameter], jacobian: Tensor) -> None:
        offset = 0
        for p in params:
            rows = jacobian[:, offset : offset + p.numel()]
            offset += p.numel()
            setattr(p, TASK_GRADS, rows.reshape(len(jacobian), *p.shape).to(p.dtype))


@WEIGHTINGS.register("adatask")
def adatask(tasks: list[str], seed: int = 0) -> Weighting:
    """AdaTask's per-task gradients of the shared parameters (for the ``adatask`` optimizer)."""
    return _AdaTaskWeighting(tasks, build_aggregator("sum", len(tasks)), seed)


class AdaTask(torch.optim.Optimizer):
    """Adam, RMSProp or AdaGrad with one accumulator per task on the shared parameters.

    For a parameter with ``task_grads`` ``g_k`` (``k = 1..K``), step ``t`` (AAAI 2023, Alg. 1 and
    its RMSProp / AdaGrad variants):

    - ``adam``: ``m_k ← β₁m_k + (1−β₁)g_k``, ``v_k ← β₂v_k + (1−β₂)g_k²``,
      ``θ ← θ − lr Σ_k m̂_k / (√v̂_k + ε)`` with ``m̂_k = m_k/(1−β₁ᵗ)``, ``v̂_k = v_k/(1−β₂ᵗ)``;
    - ``rmsprop``: ``v_k ← αv_k + (1−α)g_k²``, ``θ ← θ − lr Σ_k g_k / (√v_k + ε)``;
    - ``adagrad``: ``G_k ← G_k + g_k²``, ``θ ← θ − lr Σ_k g_k / (√G_k + ε)``.

    A parameter without ``task_grads`` gets the same rule with ``K = 1`` on ``.grad`` (so with
    ``weight_decay=0`` it is exactly ``torch.optim.Adam`` / ``RMSprop(alpha, eps)`` /
    ``Adagrad(eps)``). Weight decay is decoupled (``θ ← θ(1 − lr·wd)`` before the step, as AdamW)
    for every parameter: the reference code ignores ``weight_decay``, and adding ``wd·θ`` to each
    of K task gradients would apply it K times. ``task_grads`` are consumed (deleted) by the step.

    Note the pitfall the paper's code shares: summing K normalised steps makes the shared step up
    to K× Adam's, so retune ``lr``.

    State per parameter: ``step`` and ``exp_avg`` / ``exp_avg_sq`` (or ``sum``) of shape
    ``[K, *shape]``; saved with ``state_dict`` like any torch optimizer.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base: str = "adam",
        lr: float = 1e-3,
        betas: tuple[float, float] | list[float] = (0.9, 0.999),
        eps: float = 1e-8,
        alpha: float = 0.99,
        weight_decay: float = 0.0,
    ) -> None:
        if base not in ("adam", "rmsprop", "adagrad"):
            raise ValueError(f"adatask base must be 'adam', 'rmsprop' or 'adagrad', got {base!r}")
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"adatask betas must be two numbers in [0, 1), got {list(betas)}")
        if lr < 0 or eps <= 0 or weight_decay < 0 or not 0.0 <= alpha < 1.0:
            raise ValueError(
                "adatask needs lr >= 0, eps > 0, weight_decay >= 0 and 0 <= alpha < 1, got "
                f"lr={lr}, eps={eps}, weight_decay={weight_decay}, alpha={alpha}"
            )
        defaults = {"lr": lr, "betas": betas, "eps": eps, "alpha": alpha,
                    "weight_decay": weight_decay}  # fmt: skip
        super().__init__(params, defaults)
        self.base = base

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                grads: Tensor | None = getattr(p, TASK_GRADS, None)
                if grads is not None:
                    delattr(p, TASK_GRADS)
                elif p.grad is not None:
                    grads = p.grad.unsqueeze(0)
                else:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(grads)
                    state["exp_avg_sq"] = torch.zeros_like(grads)
                if state["exp_avg"].shape != grads.shape:
                    raise RuntimeError(
                        f"adatask: a parameter's number of gradient rows changed from "
                        f"{state['exp_avg'].shape[0]} to {grads.shape[0]}"
                    )
                state["step"] += 1
                t = float(state["step"])
                if wd:
                    p.mul_(1 - lr * wd)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if self.base == "adam":
                    m.lerp_(grads, 1 - beta1)
                    v.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
                    denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
                    update = (m / (1 - beta1**t) / denom).sum(0)
                elif self.base == "rmsprop":
                    v.mul_(group["alpha"]).addcmul_(grads, grads, value=1 - group["alpha"])
                    update = (grads / v.sqrt().add_(eps)).sum(0)
                else:
                    v.addcmul_(grads, grads)
                    update = (grads / v.sqrt().add_(eps)).sum(0)
                p.add_(update, alpha=-lr)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:  # a skipped step's per-task gradients go too
            for p in group["params"]:
                if hasattr(p, TASK_GRADS):
                    delattr(p, TASK_GRADS)


@OPTIMIZERS.register("adatask")
def adatask_optimizer(
    params: Iterable[Any],
    base: str = "adam",
    lr: float = 1e-3,
    betas: list[float] | tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    alpha: float = 0.99,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """AdaTask (Yang et al., AAAI 2023) over ``base`` = adam | rmsprop | adagrad; pair it with
    ``weighting: {name: adatask}``."""
    return AdaTask(params, base, lr, betas, eps, alpha, weight_decay)
