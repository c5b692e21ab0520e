"""Helpers shared by the stateful loss weightings (``dwa``, ``famo``, ``gradnorm``, ``rlw``, ...).

- :func:`checked_task_losses`: the bundle's per-task losses, refusing a task the weighting does not
  know;
- :func:`add_terms`: the sum of a list of terms plus the joint terms (weight 1);
- :func:`loss_vector` and :func:`global_mean`: the detached ``[T]`` vector of a micro-batch's
  losses (in the weighting's task order) and its average over processes, task by task, over the
  processes where the task is present. Every statistic a weighting keeps goes through
  :func:`global_mean` first, so every process updates identical state (DDP also broadcasts the
  buffers of rank 0 at each forward, which would silently overwrite any process-local statistic);
- :func:`masked_adam_`: one ``torch.optim.Adam`` step on the entries of a buffer selected by a mask
  (per-entry step counts), with its moments in buffers, so that a method that updates its own state
  (FAMO's logits, GradNorm's weights) checkpoints and resumes it bit-exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from unirep.losses.bundle import LossBundle
from unirep.weighting.base import process_mean


def checked_task_losses(bundle: LossBundle, tasks: list[str]) -> dict[str, Tensor]:
    """``bundle.task_losses()``; a task outside ``tasks`` is a KeyError naming it."""
    losses = bundle.task_losses()
    unknown = [t for t in losses if t not in tasks]
    if unknown:
        raise KeyError(f"tasks {unknown} are not among the weighting's tasks {tasks}")
    return losses


def add_terms(terms: list[Tensor], joint: Tensor | None) -> Tensor:
    """``Σ terms + joint`` (joint may be None); an empty bundle is an error."""
    if joint is not None:
        terms = [*terms, joint]
    assert terms, "empty LossBundle"
    return sum(terms[1:], terms[0])


def loss_vector(losses: dict[str, Tensor], tasks: list[str], like: Tensor) -> tuple[Tensor, Tensor]:
    """``(values, present)``: ``[T]`` detached losses in the order of ``tasks`` (dtype and device of
    ``like``) and a ``[T]`` bool mask of the tasks present with a finite loss; absent or non-finite
    entries are 0. No host synchronisation."""
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    absent = torch.full((), float("nan"), dtype=like.dtype, device=like.device)
    values = torch.stack(
        [losses[t].detach().reshape(()).to(like) if t in losses else absent for t in tasks]
    )
    present = torch.isfinite(values)  # absent tasks are NaN here: no host-to-device copy
    return torch.where(present, values, zero), present


def global_mean(
    values: Tensor, present: Tensor, accelerator: Any, *extra: Tensor
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Average ``[T]`` statistics over the processes where each task is present.

    One all-reduce of ``[2 + len(extra), T]`` (none with one process). Returns ``(mean, count,
    extra_means)``: ``mean[t] = Σ_p v_p[t] m_p[t] / Σ_p m_p[t]`` (0 where no process has the task),
    ``count[t] = Σ_p m_p[t] / P`` (the fraction of processes with the task; > 0 where present
    anywhere), and each ``extra`` averaged the same way. With one process the mean is ``values``
    itself, bit for bit.
    """
    mask = present.to(values.dtype)
    rows = torch.stack([values * mask, mask, *(e.to(values.dtype) * mask for e in extra)])
    rows = process_mean(rows, accelerator)
    count = rows[1]
    known = count > 0
    safe = torch.where(known, count, torch.ones_like(count))
    zero = torch.zeros_like(count)

    def mean(row: Tensor) -> Tensor:
        return torch.where(known, row / safe, zero)

    return mean(rows[0]), count, [mean(r) for r in rows[2:]]


def masked_adam_(
    param: Tensor,
    grad: Tensor,
    mask: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    steps: Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """One ``torch.optim.Adam`` step (L2 ``weight_decay`` added to the gradient, no amsgrad) on the
    entries of ``param`` where ``mask``; the others, their moments and their step counts are left
    as they are. ``steps`` (long, shape of ``param``) counts each entry's own steps for the bias
    corrections, so with every entry always selected this is ``torch.optim.Adam``'s single-tensor
    update. Everything is updated in place (buffers)."""
    beta1, beta2 = betas
    new_steps = steps + mask.to(steps.dtype)
    grad = grad.to(param.dtype)
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    m = exp_avg.lerp(grad, 1 - beta1)
    v = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    wide = torch.float32 if param.device.type == "mps" else torch.float64  # Adam's Python floats
    count = new_steps.clamp_min(1).to(wide)
    step_size = (lr / (1 - beta1**count)).to(param.dtype)
    bias2_sqrt = ((1 - beta2**count) ** 0.5).to(param.dtype)
    denom = (v.sqrt() / bias2_sqrt).add_(eps)
    updated = param + (-step_size) * m / denom
    param.copy_(torch.where(mask, updated, param))
    exp_avg.copy_(torch.where(mask, m, exp_avg))
    exp_avg_sq.copy_(torch.where(mask, v, exp_avg_sq))
    steps.copy_(new_steps)


def finite_float(name: str, value: Any, *, low: float | None = None, strict: bool = False) -> float:
    """``value`` (a config kwarg) as a finite float, at least ``low`` (above it when ``strict``),
    or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (out <= low if strict else out < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")
    return out


def positive_int(name: str, value: Any) -> int:
    """``value`` (a config kwarg) as an int >= 1, or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)
