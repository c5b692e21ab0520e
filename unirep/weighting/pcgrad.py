"""``pcgrad``: gradient surgery on the shared parameters (projecting conflicting task gradients).

Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning",
NeurIPS 2020 (Algorithm 1). The combination is torchjd's :class:`torchjd.aggregation.PCGrad`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchjd.aggregation import PCGrad as PCGradAggregator

from unirep.losses.bundle import LossBundle
from unirep.weighting.base import WEIGHTINGS, Weighting

_UNSUPPORTED = ("DEEPSPEED", "FSDP", "MEGATRON_LM")


@WEIGHTINGS.register("pcgrad")
class PCGrad(Weighting):
    """PCGrad on the shared parameters; every other parameter gets its ordinary gradient.

    Rule (Yu et al. 2020, Alg. 1, as torchjd 0.18 implements it). With ``g_t = ∇_θs L_t``:
    for each task ``i``, start from ``g_i^PC = g_i``; for each other task ``j`` in a random order,
    if ``g_i^PC · g_j < 0`` replace ``g_i^PC ← g_i^PC − (g_i^PC · g_j / ‖g_j‖²) g_j`` (always
    projecting onto the *original* ``g_j``; no ε in the denominator: a zero ``g_j`` never
    conflicts). The shared update is the **sum** ``Σ_i g_i^PC`` (not the mean), so with no
    conflict it equals the gradient of ``sum``. torchjd computes it from the Gramian ``J Jᵀ``
    (``[T, T]``) as weights ``w`` (``[T]``), then ``w @ J``: ``w_t`` is the coefficient of
    ``g_t`` in ``Σ_i g_i^PC``, i.e. 1 plus what the projections of the other tasks' gradients
    away from ``g_t`` add (so ``w_t ≥ 1``); it is logged as ``weight/<task>``. The task orders
    are drawn with ``torch.randperm`` (they only matter with 3 or more tasks).

    One call, for one micro-batch:

    1. ``L_t`` = :meth:`LossBundle.task_losses` ``[t]`` (supervised plus its distillation
       terms), scaled like ``accelerator.backward`` scales its loss: divided by
       ``gradient_accumulation_steps`` and, with an fp16 ``GradScaler``, multiplied by its
       current scale.
    2. ``J`` (``[T + 1, n]``, ``n`` = number of shared scalars, flattened in the order of
       ``shared``): row ``t`` is ``∇_θs L_t`` from ``torch.autograd.grad`` (graph retained; a
       task absent from the batch, or one whose loss does not reach θs, gets a zero row); the
       last row is the gradient of the joint terms (zeros when there are none).
    3. With several processes, ``J`` is averaged over processes (``accelerator.reduce(J,
       "mean")``) **before** combining: PCGrad sees the gradients of the global batch, as DDP
       would average them, and every process combines the same matrix, so the shared
       parameters stay identical across processes.
    4. ``d = PCGrad(J[:T]) + J[T]`` (``[n]``): joint terms belong to no task and are added as is.
       torchjd draws its task orders from the global CPU generator; we draw them inside
       ``torch.random.fork_rng`` from a generator seeded with ``seed + calls`` (``calls`` is a
       checkpointed buffer), so every process uses the same orders, resuming reproduces them and
       the run's own random stream is untouched.
    5. ``accelerator.backward(bundle.total())``: heads, adapters and any weighting state get
       their usual gradient (DDP all-reduces them as usual).
    6. The shared parameters' ``.grad`` is set to ``(.grad before step 5) + d``: step 5's
       contribution on θs is replaced, while earlier micro-batches of an accumulation window
       (already in ``.grad``) are kept.

    Cost: ``T`` (+1 with joint terms) extra backward passes through the shared trunk, a ``[T+1,
    n]`` buffer, one all-reduce of it per micro-batch, and a copy of the shared gradients.
    Not supported with DeepSpeed, FSDP or Megatron-LM (their gradients are not plain ``.grad``).

    Args:
        tasks: task names, in the run's order (rows of ``J``, order of the logs).
        seed: seeds the task orders (only matter with 3 or more tasks).

    Returns (from :meth:`backward`): ``gradcos/<a>~<b>`` for every pair ``a`` before ``b`` in
    ``tasks``, the cosine between the two tasks' process-averaged shared gradients (0 when one of
    them is zero), and ``weight/<t>``, the PCGrad weight of each task's gradient.
    """

    calls: Tensor

    def __init__(self, tasks: list[str], seed: int = 0) -> None:
        super().__init__(tasks)
        self.seed = int(seed)
        self.aggregator = PCGradAggregator()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def backward(
        self, bundle: LossBundle, shared: list[nn.Parameter], accelerator: Any
    ) -> dict[str, float]:
        if getattr(accelerator, "distributed_type", None) in _UNSUPPORTED:
            raise ValueError(f"weighting=pcgrad does not support {accelerator.distributed_type}")
        params = [p for p in shared if p.requires_grad]
        if not params:
            raise ValueError("pcgrad needs at least one shared parameter that requires grad")
        task_losses = bundle.task_losses()
        unknown = [t for t in task_losses if t not in self.tasks]
        if unknown:
            raise KeyError(f"tasks {unknown} are not among the weighting's tasks {self.tasks}")

        scale = 1.0 / accelerator.gradient_accumulation_steps
        if accelerator.scaler is not None:
            scale *= accelerator.scaler.get_scale()
        dtype = torch.float32
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
        losses = [task_losses.get(t) for t in self.tasks] + [bundle.joint_loss()]
        jacobian = torch.stack([_flat_grad(loss, scale, params, dtype) for loss in losses])
        if accelerator.num_processes > 1:
            jacobian = accelerator.reduce(jacobian, "mean")
        task_jacobian, joint_grad = jacobian[:-1], jacobian[-1]

        # the aggregator's own two steps (Gramian → weights, then w @ J), to log the weights
        gramian = task_jacobian @ task_jacobian.T
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed + int(self.calls))
            weights = self.aggregator.gramian_weighting(gramian)
        self.calls += 1
        update = weights @ task_jacobian + joint_grad

        saved = [None if p.grad is None else p.grad.detach().clone() for p in params]
        accelerator.backward(bundle.total())
        offset = 0
        with torch.no_grad():
            for p, before in zip(params, saved, strict=True):
                grad = update[offset : offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
                if before is not None:
                    grad = before + grad
                if p.grad is None:
                    p.grad = grad.clone()
                else:
                    p.grad.copy_(grad)  # in place: DDP may hold .grad as a bucket view
        return self._logs(gramian, weights)

    def _logs(self, gramian: Tensor, weights: Tensor) -> dict[str, float]:
        norms = gramian.diagonal().clamp_min(0).sqrt()
        cosine = gramian / (norms[:, None] * norms[None, :]).clamp_min(
            torch.finfo(norms.dtype).tiny
        )
        cosine_list, weight_list = cosine.tolist(), weights.tolist()
        logs = {f"weight/{t}": w for t, w in zip(self.tasks, weight_list, strict=True)}
        for a in range(len(self.tasks)):
            for b in range(a + 1, len(self.tasks)):
                logs[f"gradcos/{self.tasks[a]}~{self.tasks[b]}"] = cosine_list[a][b]
        return logs


def _flat_grad(
    loss: Tensor | None, scale: float, params: list[nn.Parameter], dtype: torch.dtype
) -> Tensor:
    """``∇_params (scale · loss)`` flattened to ``[n]`` in ``dtype``; zeros where none flows."""
    if loss is None or not loss.requires_grad:
        return torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=dtype)
    grads = torch.autograd.grad(loss * scale, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p, dtype=dtype) if g is None else g.to(dtype)).reshape(-1)
            for p, g in zip(params, grads, strict=True)
        ]
    )
