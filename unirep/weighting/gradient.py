"""Gradient methods: per-task gradients, averaged over processes, combined by an aggregator.

One class, :class:`GradientWeighting`, does the bookkeeping every gradient method shares (the
per-task gradients of the shared parameters, their average over processes *before* combining,
gradient accumulation, loss scaling, absent tasks, logs); an
:class:`~unirep.weighting.aggregators.Aggregator` says how the gradients combine. The registry
entries (``mgda``, ``pcgrad``, ``cagrad``, ``imtl``, ``nash_mtl``, ``aligned_mtl``, ``upgrad``,
``mgda_ub``) pick an aggregator and where the gradients are taken.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from unirep.losses.bundle import LossBundle
from unirep.weighting.aggregators import Aggregator, JacobianAggregator, build_aggregator
from unirep.weighting.base import WEIGHTINGS, LossWeighting, Weighting

_UNSUPPORTED = ("DEEPSPEED", "FSDP", "MEGATRON_LM")


class GradientWeighting(Weighting):
    """Combine the per-task gradients of the shared parameters (or representation) by weights.

    **On the shared parameters** (``on="parameters"``: MGDA, PCGrad, CAGrad, IMTL-G, Nash-MTL,
    Aligned-MTL, UPGrad). Per micro-batch, with ``L_t`` the task's loss (supervised plus its
    distillation terms; IMTL-L / -H first rescale it, see ``loss_scale``):

    1. ``J`` (``[T + 1, n]``, float32 or wider, ``n`` = number of shared scalars in the order of
       ``shared``): row ``t`` is ``∇_θs L_t / A`` (``A`` = accumulation steps) from
       ``torch.autograd.grad`` (graph kept; a task absent from the batch, or whose loss does not
       reach θs, gives a zero row); the last row is the joint terms' gradient. Rows are summed
       over the micro-batches of an accumulation window.
    2. ``accelerator.backward(Σ_t L_t + joint)``: heads, adapters and the weighting's own state
       get their ordinary gradients (DDP all-reduces them at the window's last micro-batch); the
       shared parameters' part of this backward is discarded (their ``.grad`` is restored).
    3. At the window's last micro-batch: ``J`` is averaged over processes
       (``accelerator.reduce(J, "mean")``) **before** combining (the aggregators are not linear:
       combining each process's gradients and averaging would be wrong), so every process combines
       the global batch's gradients and a 2-process run computes what a 1-process run computes on
       the same global batch. Tasks whose row is zero on every process (absent from the whole
       window) get weight 0 and are left out of the combination. ``w = aggregator(J Jᵀ)``
       (``[T]``), drawn inside ``torch.random.fork_rng`` seeded with ``seed + calls`` (same task
       orders on every process, reproduced on resume, the run's RNG untouched). A Gramian that is
       not finite (an fp16 overflow) reaches no aggregator: ``w`` is 1 for the present tasks (the
       sum's update, as non-finite, so the GradScaler skips the step; no method's state takes
       it in).
    4. The shared parameters' ``.grad`` becomes ``w @ J[:T] + J[T]`` (times the fp16 loss
       scale, when a ``GradScaler`` is active: ``J`` itself is combined unscaled, in float32).

    Accumulating ``J`` over the window and combining once means accumulation behaves like a
    larger batch, as it does for ``sum``.

    **On the shared representation** (``on="representation"``: MGDA-UB, Sener & Koltun 2018 §3.3).
    Per micro-batch: ``Z`` is every tensor the student's shared trunk returned in this forward
    (captured by :class:`~unirep.training.trainable.TrainableModule`); row ``t`` of ``J_Z`` is
    ``∇_Z L_t`` flattened (``[T, |Z|]``); the Gramian of the *global* batch is
    ``Σ_p J_Zp J_Zpᵀ / P²`` (process ``p``'s rows are disjoint coordinates of the global ``Z``),
    computed with one all-reduce of a ``[T, T]`` matrix (``∇_Z`` of the loss times the fp16 loss
    scale, then unscaled); ``w = aggregator(M)``; then
    ``accelerator.backward(Σ_t w_t L_t + joint)``, one backward through the trunk, as the
    reference (which weights the heads' gradients by ``w`` too). Combined per micro-batch.

    Args:
        tasks: task names, in the run's order (rows of ``J``, order of the logs).
        aggregator: how the gradients combine (``[T, T]`` Gramian → ``[T]`` weights).
        seed: seeds the aggregator's random choices (PCGrad's task orders).
        on: ``"parameters"`` or ``"representation"``.
        loss_scale: an optional module mapping the task losses ``{t: L_t}`` to rescaled ones
            before anything else (IMTL-L's learnable ``e^{s_t} L_t − s_t``).

    Returns (from :meth:`backward`, at the window's last micro-batch): ``weight/<t>`` (the
    combination weight ``w_t``) and ``gradcos/<a>~<b>`` for every pair, the cosine between the two
    tasks' process-averaged gradients (0 when one is zero).

    Cost: ``T`` (+1 with joint terms) extra backward passes through the trunk per micro-batch on
    the parameters (only through the heads and down to ``Z`` on the representation), a
    ``[T + 1, n]`` buffer, and one all-reduce of it per optimizer step.
    """

    calls: Tensor

    def __init__(
        self,
        tasks: list[str],
        aggregator: Aggregator,
        seed: int = 0,
        on: str = "parameters",
        loss_scale: nn.Module | None = None,
    ) -> None:
        super().__init__(tasks)
        if on not in ("parameters", "representation"):
            raise ValueError(f"on must be 'parameters' or 'representation', got {on!r}")
        self.aggregator = aggregator
        self.seed = int(seed)
        self.on = on
        self.loss_scale = loss_scale
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self._jacobian: Tensor | None = None  # summed over the window so far

    @property
    def wants_representation(self) -> bool:
        """Whether the trainable module must capture the trunk's outputs (``bundle.shared``)."""
        return self.on == "representation"

    # ------------------------------------------------------------------------------------------

    def _losses(self, bundle: LossBundle) -> tuple[list[Tensor | None], Tensor | None]:
        task_losses = bundle.task_losses()
        unknown = [t for t in task_losses if t not in self.tasks]
        if unknown:
            raise KeyError(f"tasks {unknown} are not among the weighting's tasks {self.tasks}")
        if self.loss_scale is not None:
            task_losses = self.loss_scale(task_losses)
        return [task_losses.get(t) for t in self.tasks], bundle.joint_loss()

    def _weights(self, gramian: Tensor, accelerator: Any) -> Tensor:
        present = gramian.diagonal() > 0
        if not bool(torch.isfinite(gramian).all()):
            # an fp16 overflow (the GradScaler then skips the step and lowers its scale) or a
            # diverged loss: no aggregator sees it (solvers raise on it; Nash-MTL's state would
            # take it in); the update is the sum's, as non-finite as the gradients
            weights = present.to(gramian.dtype)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(self.seed + int(self.calls))
                weights = self.aggregator(gramian, present)
        self.calls += 1
        return weights

    def _direction(self, jacobian: Tensor, gramian: Tensor) -> Tensor:
        """A :class:`~unirep.weighting.aggregators.JacobianAggregator`'s direction ``[n]`` from
        the task rows ``[T, n]``, seeded like :meth:`_weights`; the sum of the present rows when
        they are not finite (no method's state takes them in)."""
        present = gramian.diagonal() > 0
        if not bool(torch.isfinite(gramian).all()):
            direction = jacobian[present].sum(0) if bool(present.any()) else jacobian[0] * 0
        else:
            with torch.random.fork_rng(devices=[jacobian.device] if jacobian.is_cuda else []):
                torch.manual_seed(self.seed + int(self.calls))
                direction = self.aggregator(jacobian, present)
        self.calls += 1
        return direction

    def backward(
        self, bundle: LossBundle, shared: list[nn.Parameter], accelerator: Any
    ) -> dict[str, float]:
        if getattr(accelerator, "distributed_type", None) in _UNSUPPORTED:
            raise ValueError(f"gradient weightings do not support {accelerator.distributed_type}")
        losses, joint = self._losses(bundle)
        if self.on == "representation":
            return self._backward_representation(bundle, losses, joint, accelerator)
        params = [p for p in shared if p.requires_grad]
        if not params:
            raise ValueError("a gradient weighting needs at least one shared parameter")
        accum = accelerator.gradient_accumulation_steps
        scaler = getattr(accelerator, "scaler", None)
        loss_scale = 1.0 if scaler is None else float(scaler.get_scale())
        dtype = torch.float32
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
        rows = [_flat_grad(loss, loss_scale / accum, params, dtype) for loss in [*losses, joint]]
        jacobian = torch.stack(rows) / loss_scale  # unscaled, float32 or wider
        self._jacobian = jacobian if self._jacobian is None else self._jacobian + jacobian

        saved = [None if p.grad is None else p.grad.detach().clone() for p in params]
        present = [loss for loss in losses if loss is not None]
        total = sum(present[1:], present[0]) if present else None
        if joint is not None:
            total = joint if total is None else total + joint
        assert total is not None, "empty LossBundle"
        accelerator.backward(total)
        sync = getattr(accelerator, "sync_gradients", True)
        update = None
        logs: dict[str, float] = {}
        if sync:
            window = self._jacobian
            self._jacobian = None
            if accelerator.num_processes > 1:
                window = accelerator.reduce(window.contiguous(), "mean")
            self.on_window(params, window)
            task_jacobian, joint_grad = window[:-1], window[-1]
            gramian = task_jacobian @ task_jacobian.T
            if isinstance(self.aggregator, JacobianAggregator):  # e.g. GradDrop, GradVac
                direction = self._direction(task_jacobian, gramian)
                update = (direction.to(dtype) + joint_grad) * loss_scale
                logs = self._logs(gramian, None)
            else:
                weights = self._weights(gramian, accelerator)
                update = (weights.to(dtype) @ task_jacobian + joint_grad) * loss_scale
                logs = self._logs(gramian, weights)
        offset = 0
        with torch.no_grad():
            for p, before in zip(params, saved, strict=True):
                grad = before
                if update is not None:
                    part = update[offset : offset + p.numel()].view_as(p).to(p.dtype)
                    grad = part if before is None else before + part
                offset += p.numel()
                if grad is None:
                    p.grad = None
                elif p.grad is None:
                    p.grad = grad.clone()
                else:
                    p.grad.copy_(grad)  # in place: DDP may hold .grad as a bucket view
        return logs

    def on_window(self, params: list[nn.Parameter], jacobian: Tensor) -> None:
        """Called at the window's last micro-batch with the process-averaged ``[T + 1, n]``
        Jacobian (rows: tasks, then the joint terms; unscaled) before it is combined (AdaTask
        hands it to its optimizer)."""

    def _backward_representation(
        self,
        bundle: LossBundle,
        losses: list[Tensor | None],
        joint: Tensor | None,
        accelerator: Any,
    ) -> dict[str, float]:
        z = [t for t in bundle.shared if t.requires_grad]
        if not z:
            raise ValueError(
                "mgda_ub needs the shared representation: the student's trunk output, captured by "
                "the trainable module (bundle.shared is empty)"
            )
        dtype = torch.promote_types(torch.float32, z[0].dtype)
        scaler = getattr(accelerator, "scaler", None)
        loss_scale = 1.0 if scaler is None else float(scaler.get_scale())
        rows = []
        for loss in losses:
            if loss is None or not loss.requires_grad:
                rows.append(torch.zeros(sum(t.numel() for t in z), device=z[0].device, dtype=dtype))
                continue
            # scaled like the backward (no fp16 underflow in ∇_Z), then unscaled
            grads = torch.autograd.grad(loss * loss_scale, z, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([
                (torch.zeros_like(t, dtype=dtype) if g is None else g.to(dtype)).reshape(-1)
                for t, g in zip(z, grads, strict=True)
            ]))  # fmt: skip
        jz = torch.stack(rows) / loss_scale
        gramian = jz @ jz.T
        if accelerator.num_processes > 1:  # Σ_p G_p / P²: the global mean loss's Gramian
            gramian = accelerator.reduce(gramian.contiguous(), "mean") / accelerator.num_processes
        weights = self._weights(gramian, accelerator)
        total: Tensor | None = joint
        for w, loss in zip(weights.tolist(), losses, strict=True):
            if loss is not None:
                total = w * loss if total is None else total + w * loss
        assert total is not None, "empty LossBundle"
        accelerator.backward(total)
        return self._logs(gramian, weights)

    def _logs(self, gramian: Tensor, weights: Tensor | None) -> dict[str, float]:
        """``weight/<t>`` (when the method has weights) and ``gradcos/<a>~<b>``."""
        norms = gramian.diagonal().clamp_min(0).sqrt()
        cosine = gramian / (norms[:, None] * norms[None, :]).clamp_min(
            torch.finfo(norms.dtype).tiny
        )
        cosine_list = cosine.tolist()
        logs: dict[str, float] = {}
        if weights is not None:
            logs = {f"weight/{t}": w for t, w in zip(self.tasks, weights.tolist(), strict=True)}
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


class IMTLLossScale(nn.Module):
    """IMTL-L (Liu et al., ICLR 2021): ``L_t ← e^{s_t} L_t − s_t`` with ``s_t`` learned (``[T]``,
    initially 0) by the run's optimizer; present tasks only."""

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.s = nn.Parameter(torch.zeros(len(self.tasks)))

    def forward(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        index = {t: i for i, t in enumerate(self.tasks)}
        return {
            t: torch.exp(self.s[index[t]]) * loss - self.s[index[t]] for t, loss in losses.items()
        }


class IMTLL(LossWeighting):
    """IMTL-L alone: ``L = Σ_t (e^{s_t} L_t − s_t) + Σ_j J_j``, one backward; the effective weight
    of task ``t`` is ``e^{s_t}`` (logged)."""

    def __init__(self, tasks: list[str]) -> None:
        super().__init__(tasks)
        self.loss_scale = IMTLLossScale(tasks)

    def combine(self, bundle: LossBundle, accelerator: Any = None) -> Tensor:
        scaled = self.loss_scale(bundle.task_losses())
        joint = bundle.joint_loss()
        terms = [*scaled.values(), *([] if joint is None else [joint])]
        assert terms, "empty LossBundle"
        return sum(terms[1:], terms[0])

    def weights(self) -> dict[str, float]:
        values = torch.exp(self.loss_scale.s.detach()).tolist()
        return dict(zip(self.tasks, values, strict=True))


# ---------------------------------------------------------------------------------------------
# Registry entries: one per method, with the method's own arguments


@WEIGHTINGS.register("mgda")
def mgda(tasks: list[str], scale: str = "mean", seed: int = 0) -> Weighting:
    """MGDA on the shared parameters (Sener & Koltun, NeurIPS 2018): the min-norm point of the
    convex hull of the per-task gradients. ``scale="sum"`` multiplies the convex weights by T."""
    return GradientWeighting(tasks, build_aggregator("mgda", len(tasks), scale=scale), seed)


@WEIGHTINGS.register("mgda_ub")
def mgda_ub(tasks: list[str], scale: str = "mean", seed: int = 0) -> Weighting:
    """MGDA-UB (Sener & Koltun, NeurIPS 2018 §3.3): MGDA on the gradients with respect to the
    shared representation (the trunk's output), one backward through the trunk."""
    aggregator = build_aggregator("mgda", len(tasks), scale=scale)
    return GradientWeighting(tasks, aggregator, seed, on="representation")


@WEIGHTINGS.register("pcgrad")
def pcgrad(tasks: list[str], seed: int = 0) -> Weighting:
    """PCGrad (Yu et al., NeurIPS 2020): conflicting gradients projected onto each other's
    normal plane, in random task orders, then summed."""
    return GradientWeighting(tasks, build_aggregator("pcgrad", len(tasks)), seed)


@WEIGHTINGS.register("cagrad")
def cagrad(
    tasks: list[str], c: float = 0.4, scale: str = "sum", rescale: int = 1, seed: int = 0
) -> Weighting:
    """CAGrad (Liu et al., NeurIPS 2021), ``c = 0.4`` (the reference's NYUv2 / Cityscapes); the
    defaults give the reference code's update ``T d / (1 + c²)`` (see the aggregator)."""
    aggregator = build_aggregator("cagrad", len(tasks), c=c, scale=scale, rescale=rescale)
    return GradientWeighting(tasks, aggregator, seed)


@WEIGHTINGS.register("imtl")
def imtl(tasks: list[str], mode: str = "h", scale: str = "mean", seed: int = 0) -> Weighting:
    """IMTL (Liu et al., ICLR 2021): ``mode="g"`` (gradient balance, closed form), ``"l"`` (loss
    balance, learned ``e^{s} L − s``, the gradients summed) or ``"h"`` (both: IMTL-L's scaled
    losses, then IMTL-G on their gradients)."""
    if mode not in ("g", "l", "h"):
        raise ValueError(f"imtl mode must be 'g', 'l' or 'h', got {mode!r}")
    if mode == "l":
        return IMTLL(tasks)
    scale_losses = IMTLLossScale(tasks) if mode == "h" else None
    aggregator = build_aggregator("imtl_g", len(tasks), scale=scale)
    return GradientWeighting(tasks, aggregator, seed, loss_scale=scale_losses)


@WEIGHTINGS.register("nash_mtl")
def nash_mtl(
    tasks: list[str],
    update_weights_every: int = 1,
    optim_niter: int = 20,
    max_norm: float = 1.0,
    seed: int = 0,
) -> Weighting:
    """Nash-MTL (Navon et al., ICML 2022): the bargaining solution ``α_i (Gα)_i = 1``, solved
    every ``update_weights_every`` steps; warns on every solver failure."""
    aggregator = build_aggregator(
        "nash_mtl", len(tasks), update_weights_every=update_weights_every,
        optim_niter=optim_niter, max_norm=max_norm,
    )  # fmt: skip
    return GradientWeighting(tasks, aggregator, seed)


@WEIGHTINGS.register("aligned_mtl")
def aligned_mtl(
    tasks: list[str], scale_mode: str = "min", scale: str = "mean", seed: int = 0
) -> Weighting:
    """Aligned-MTL (Senushkin et al., CVPR 2023): the gradient matrix's condition number made 1;
    averaged as torchjd (``scale="sum"``: summed, as the original code)."""
    aggregator = build_aggregator("aligned_mtl", len(tasks), scale_mode=scale_mode, scale=scale)
    return GradientWeighting(tasks, aggregator, seed)


@WEIGHTINGS.register("upgrad")
def upgrad(tasks: list[str], scale: str = "mean", seed: int = 0) -> Weighting:
    """UPGrad (Quinton & Rey, 2024): projections onto the dual cone, averaged (``scale="sum"``:
    summed)."""
    return GradientWeighting(tasks, build_aggregator("upgrad", len(tasks), scale=scale), seed)
