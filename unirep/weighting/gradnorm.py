"""``gradnorm``: GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient
Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from unirep.losses.bundle import LossBundle
from unirep.weighting.base import WEIGHTINGS, Weighting
from unirep.weighting.loss_stats import (
    add_terms,
    checked_task_losses,
    finite_float,
    global_mean,
    loss_vector,
    masked_adam_,
)


@WEIGHTINGS.register("gradnorm")
class GradNormWeighting(Weighting):
    """The network trains on ``Σ_{t in batch} w_t·L_t + Σ_j J_j``; the weights ``w`` (``Σw = T``)
    follow ``L_grad = Σ_i |G_i − [Ḡ·r_i^α]|``.

    Per micro-batch (:meth:`backward`), with ``W`` the last tensor with ``ndim >= 2`` among the
    ``shared`` parameters (the paper's "last shared layer"):

    1. ``n_i = ‖∇_W L_i‖₂`` for each present task (``torch.autograd.grad``, graph kept; times the
       fp16 loss scale and back, so small gradients do not underflow); ``G_i = w_i·n_i`` (``w_i >
       0``, so ``G_i = ‖∇_W (w_i L_i)‖``). The norms and the losses are averaged over processes
       (per task over the processes that have it) before any use.
    2. ``L_i(0)``: a task's first such (process-averaged) loss, kept in a buffer. ``L̃_i =
       L_i/L_i(0)``, ``r_i = L̃_i / mean_j L̃_j``, ``Ḡ = mean_j G_j`` (means over the present tasks),
       target ``Ḡ·r_i^α`` held constant. ``∂L_grad/∂w_i = sign(G_i − target_i)·n_i`` (analytic:
       ``∂G_i/∂w_i = n_i``), added to a ``[T]`` buffer.
    3. ``accelerator.backward(Σ w_i L_i + joint)`` with ``w`` detached: one ordinary backward.

    Once per optimizer step (:meth:`after_step`): the accumulated gradient, averaged over the
    micro-batches that had the task, drives one Adam step on ``w`` (``lr`` 0.025, the learning
    rate nash-mtl gives learnable weights; state in buffers; tasks without a gradient this step are
    left untouched), then ``w`` is clamped at ``1e-6`` from below (the weights must stay positive)
    and renormalised to ``Σ_t w_t = T`` over all tasks of the run, as in the paper.

    Differences from LibMTL's ``GradNorm`` (which differs from the paper): the paper's
    renormalisation instead of ``T·softmax``; norms on ``W`` only instead of every shared parameter
    (1 backward plus T cheap partial ones, instead of T full backwards); ``L_i(0)`` from the first
    step a task appears instead of an epoch-0 average.

    ``w`` is not trained by the run's optimizer (:meth:`optimized_parameters` is empty; it is a
    buffer). State (buffers, checkpointed): ``w``, ``initial`` / ``initial_known`` (``L_i(0)``),
    ``grad_sum`` / ``grad_count`` (the open step), ``exp_avg``, ``exp_avg_sq``, ``adam_steps``.

    Args:
        tasks: task names, in the run's order.
        alpha: the asymmetry α (LibMTL's 1.5).
        lr: learning rate of the weights' Adam.

    Returns (from :meth:`backward`): ``weight/<t>`` (``w_t``) and ``gradnorm/<t>`` (the
    process-averaged ``G_t``, 0 for a task absent from the micro-batch everywhere).

    Shapes: every loss term is a scalar; the state vectors are ``[T]``.
    """

    min_weight = 1e-6
    w: Tensor
    initial: Tensor
    initial_known: Tensor
    grad_sum: Tensor
    grad_count: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    adam_steps: Tensor

    def __init__(self, tasks: list[str], alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__(tasks)
        self.alpha = finite_float("alpha", alpha, low=0.0)
        self.lr = finite_float("lr", lr, low=0.0)
        count = len(self.tasks)
        self.register_buffer("w", torch.ones(count))
        self.register_buffer("initial", torch.zeros(count))
        self.register_buffer("initial_known", torch.zeros(count, dtype=torch.bool))
        self.register_buffer("grad_sum", torch.zeros(count))
        self.register_buffer("grad_count", torch.zeros(count))
        self.register_buffer("exp_avg", torch.zeros(count))
        self.register_buffer("exp_avg_sq", torch.zeros(count))
        self.register_buffer("adam_steps", torch.zeros(count, dtype=torch.long))
        self._index = {task: i for i, task in enumerate(self.tasks)}

    def optimized_parameters(self) -> list[nn.Parameter]:
        return []  # w is updated by after_step only

    @staticmethod
    def last_shared_layer(shared: list[nn.Parameter]) -> nn.Parameter:
        """The last tensor with ``ndim >= 2`` among ``shared`` that requires grad."""
        for p in reversed(shared):
            if p.requires_grad and p.ndim >= 2:
                return p
        raise ValueError(
            "gradnorm needs a shared weight matrix (a shared parameter with ndim >= 2); "
            f"got shapes {[tuple(p.shape) for p in shared]}"
        )

    def backward(
        self, bundle: LossBundle, shared: list[nn.Parameter], accelerator: Any
    ) -> dict[str, float]:
        losses = checked_task_losses(bundle, self.tasks)
        layer = self.last_shared_layer(shared)
        scaler = getattr(accelerator, "scaler", None)
        scale = 1.0 if scaler is None else float(scaler.get_scale())
        norms = torch.zeros_like(self.w)
        for task, loss in losses.items():
            if not loss.requires_grad:
                continue
            (grad,) = torch.autograd.grad(loss * scale, layer, retain_graph=True, allow_unused=True)
            if grad is not None:
                norms[self._index[task]] = grad.detach().to(norms.dtype).norm() / scale
        values, present = loss_vector(losses, self.tasks, self.w)
        present = present & torch.isfinite(norms)
        loss_mean, count, (norm_mean,) = global_mean(values, present, accelerator, norms)
        self._accumulate(loss_mean, norm_mean, count > 0)

        weights = self.w.detach().clone()  # the weights of this step, before any update
        terms = [weights[self._index[t]] * loss for t, loss in losses.items()]
        accelerator.backward(add_terms(terms, bundle.joint_loss()))
        logs = {f"weight/{t}": v for t, v in zip(self.tasks, weights.tolist(), strict=True)}
        gnorms = (weights * norm_mean).tolist()
        logs.update({f"gradnorm/{t}": v for t, v in zip(self.tasks, gnorms, strict=True)})
        return logs

    @torch.no_grad()
    def _accumulate(self, loss: Tensor, norm: Tensor, present: Tensor) -> None:
        """Record ``L_i(0)`` where new and add ``∂L_grad/∂w`` of this micro-batch."""
        new = present & ~self.initial_known
        self.initial.copy_(torch.where(new, loss, self.initial))
        self.initial_known |= present
        usable = present & (self.initial > 0) & (loss > 0)
        ones = torch.ones_like(loss)
        ratio = torch.where(usable, loss / torch.where(usable, self.initial, ones), ones)
        k = usable.sum().clamp_min(1).to(loss.dtype)
        inverse_rate = ratio / (torch.where(usable, ratio, 0.0).sum() / k)
        gnorm = self.w * norm
        mean_gnorm = torch.where(usable, gnorm, 0.0).sum() / k
        target = mean_gnorm * inverse_rate**self.alpha
        grad = torch.where(usable, torch.sign(gnorm - target) * norm, 0.0)
        self.grad_sum += grad
        self.grad_count += usable.to(self.grad_count.dtype)

    @torch.no_grad()
    def after_step(self, task_losses: dict[str, Tensor], accelerator: Any) -> None:
        had = self.grad_count > 0
        grad = self.grad_sum / self.grad_count.clamp_min(1)
        masked_adam_(self.w, grad, had, self.exp_avg, self.exp_avg_sq, self.adam_steps, lr=self.lr)
        self.w.clamp_(min=self.min_weight)
        self.w.mul_(len(self.tasks) / self.w.sum())
        self.grad_sum.zero_()
        self.grad_count.zero_()
