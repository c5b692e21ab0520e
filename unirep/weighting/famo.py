"""``famo``: Fast Adaptive Multitask Optimization (Liu, Liang, Lin, Liu & Stone, NeurIPS 2023;
``Cranial-XIX/FAMO``; torchjd ``FAMO``, whose formula and defaults this follows)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from unirep.losses.bundle import LossBundle
from unirep.weighting.base import WEIGHTINGS, LossWeighting
from unirep.weighting.loss_stats import (
    add_terms,
    checked_task_losses,
    finite_float,
    global_mean,
    loss_vector,
    masked_adam_,
)

EPSILON = 1e-8


@WEIGHTINGS.register("famo")
class FAMOWeighting(LossWeighting):
    """``L = c·Σ_{i in batch} z_i·log(ℓ_i − b_i + ε) + Σ_j J_j``, ``z = softmax(w)``,
    ``c = (Σ_{i in batch} z_i/(ℓ_i − b_i + ε))⁻¹`` (detached), ``ε = 1e-8``.

    Backpropagating ``L`` gives FAMO's update direction, a convex combination of the present tasks'
    gradients (torchjd's ``FAMO`` formula: on a bundle with every task and no joint term the value
    and gradients are torchjd's). ``b`` is ``min_losses`` (0 by default: the losses must then be
    positive).

    The logits ``w`` are not trained by the run's optimizer (:meth:`optimized_parameters` leaves
    them out; they are a buffer). :attr:`wants_losses_after_step` asks the trainer for the losses
    of the step's last micro-batch recomputed after the update; :meth:`after_step` then takes one
    Adam step (``lr`` 0.025, L2 ``weight_decay`` 1e-3, betas (0.9, 0.999), eps 1e-8, as torchjd's
    internal ``Adam``) on ``w`` in the direction ``∇_w Σ_i z_i δ_i`` with
    ``δ_i = log(ℓ_i^before − b_i + ε) − log(ℓ_i^after − b_i + ε)``.

    Processes: ``ℓ^before`` (kept from :meth:`combine`, every micro-batch overwriting the last) and
    ``ℓ^after`` are each averaged over processes, per task over the processes that have it
    (:func:`~unirep.weighting.loss_stats.global_mean`), before the logarithm, so every process
    takes the same step.

    Partial labels. Only tasks present (with a finite loss) in both the before and after losses
    are updated: the softmax is restricted to them (``z_P = softmax(w_P)``, the weights the
    update actually used after ``c`` renormalised them), and the other logits, their Adam moments
    and step counts are left untouched (:func:`~unirep.weighting.loss_stats.masked_adam_`, per-task
    bias corrections), so an absent task's weight does not drift. With every task present this is
    torchjd's update.

    State (buffers, checkpointed; a resume is bit-exact): ``w`` (``[T]`` logits), ``exp_avg``,
    ``exp_avg_sq``, ``adam_steps`` (Adam's state, ``[T]``), ``before``, ``before_known`` (``[T]``,
    the last micro-batch's process-averaged losses) and ``min_losses``. ``weight/<t>`` logs
    ``z_t = softmax(w)_t`` (the gradient's coefficient on ``ℓ_t`` is ``c·z_t/(ℓ_t − b_t + ε)``).

    Args:
        tasks: task names, in the run's order.
        lr: learning rate of the logits' Adam (the paper's 0.025).
        weight_decay: its L2 weight decay (1e-3: the paper's Algorithm 2, LibMTL, torchjd; the
            official code uses 1e-5).
        min_losses: ``{task: b_t}`` lower bounds of the losses (missing tasks: 0).

    Shapes: every loss term is a scalar; the state vectors are ``[T]``; the result is a scalar.
    """

    wants_losses_after_step = True
    w: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    adam_steps: Tensor
    before: Tensor
    before_known: Tensor
    min_losses: Tensor

    def __init__(
        self,
        tasks: list[str],
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        min_losses: dict[str, float] | None = None,
    ) -> None:
        super().__init__(tasks)
        self.lr = finite_float("lr", lr, low=0.0)
        self.weight_decay = finite_float("weight_decay", weight_decay, low=0.0)
        bounds = {} if min_losses is None else min_losses
        if not isinstance(bounds, dict):
            raise ValueError(f"min_losses must map task names to numbers, got {bounds!r}")
        unknown = sorted(str(t) for t in bounds if t not in self.tasks)
        if unknown:
            raise ValueError(f"min_losses name unknown tasks {unknown}; valid tasks: {self.tasks}")
        count = len(self.tasks)
        values = [finite_float(f"min_losses[{t!r}]", bounds.get(t, 0.0)) for t in self.tasks]
        self.register_buffer("min_losses", torch.tensor(values))
        self.register_buffer("w", torch.zeros(count))
        self.register_buffer("exp_avg", torch.zeros(count))
        self.register_buffer("exp_avg_sq", torch.zeros(count))
        self.register_buffer("adam_steps", torch.zeros(count, dtype=torch.long))
        self.register_buffer("before", torch.zeros(count))
        self.register_buffer("before_known", torch.zeros(count, dtype=torch.bool))
        self._index = {task: i for i, task in enumerate(self.tasks)}

    def optimized_parameters(self) -> list[nn.Parameter]:
        return []  # the logits are updated by after_step only

    def combine(self, bundle: LossBundle, accelerator: Any = None) -> Tensor:
        losses = checked_task_losses(bundle, self.tasks)
        values, present = loss_vector(losses, self.tasks, self.before)
        mean, count, _ = global_mean(values, present, accelerator)
        self.before.copy_(mean)
        self.before_known.copy_(count > 0)
        joint = bundle.joint_loss()
        order = [t for t in self.tasks if t in losses]
        if not order:
            return add_terms([], joint)
        stacked = torch.stack([losses[t] for t in order])
        weights, bounds = torch.softmax(self.w, dim=0), self.min_losses
        if len(order) < len(self.tasks):
            index = torch.tensor([self._index[t] for t in order], device=self.w.device)
            weights, bounds = weights[index], bounds[index]
        weights, bounds = weights.to(stacked.dtype), bounds.to(stacked.dtype)
        shifted = stacked - bounds + EPSILON
        normalizer = (weights / shifted).sum().detach()
        return add_terms([((weights / normalizer) * torch.log(shifted)).sum()], joint)

    @torch.no_grad()
    def after_step(self, task_losses: dict[str, Tensor], accelerator: Any) -> None:
        values, present = loss_vector(task_losses, self.tasks, self.before)
        after, count, _ = global_mean(values, present, accelerator)
        before = self.before - self.min_losses + EPSILON
        after = after - self.min_losses + EPSILON
        # a loss at or below its bound has no logarithm: that task is left out of the update
        update = self.before_known & (count > 0) & (before > 0) & (after > 0)
        ones = torch.ones_like(before)
        delta = torch.log(torch.where(update, before, ones)) - torch.log(
            torch.where(update, after, ones)
        )  # 0 where not updated
        # ∇_w Σ_i z_i δ_i with z = softmax over the updated tasks (softmax's backward)
        logits = torch.where(update, self.w, torch.full_like(self.w, float("-inf")))
        z = torch.softmax(logits, dim=0)
        z = torch.where(update, z, torch.zeros_like(z))  # all -inf (none updated) gives NaN
        grad = z * (delta - (delta * z).sum())
        masked_adam_(
            self.w, grad, update, self.exp_avg, self.exp_avg_sq, self.adam_steps,
            lr=self.lr, weight_decay=self.weight_decay,
        )  # fmt: skip

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, torch.softmax(self.w, dim=0).tolist(), strict=True))
