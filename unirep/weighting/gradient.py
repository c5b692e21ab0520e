"""Gradient methods: per-task gradients, averaged over processes, combined by an aggregator.

One class, :class:`GradientWeighting`, does the bookkeeping every gradient method shares (the
per-task gradients of the shared parameters, their average over processes *before* combining,
gradient accumulation, loss scaling, absent tasks, logs); an
:class:`~unirep.weighting.aggregators.Aggregator` says how the gradients combine. The registry
entries (``mgda``, ``pcgrad``, ``cagrad``, ``imtl``, ``nash_mtl``, ``aligned_mtl``, ``upgrad``,
``mgda_ub``) pick an aggregator and where the gradients are taken.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from unirep.losses.bundle import LossBundle
from unirep.weighting.aggregators import Aggregator, JacobianAggregator, build_aggregator
from unirep.weighting.base import WEIGHTINGS, LossWeighting, Weighting
from unirep.weighting.gramian import TrunkGramian

_UNSUPPORTED = ("DEEPSPEED", "FSDP", "MEGATRON_LM")
_ROUTES = {"jacobian": 1, "gramian": 2}  # GradientWeighting.route_code
PATHS = ("auto", "jacobian", "gramian")
"""How the Gramian of a Gramian-only method is computed (``path=``): ``jacobian`` (``J Jᵀ``
from the ``[T + 1, n]`` buffer), ``gramian`` (torchjd's autogram engine, no buffer; one process,
no accumulation) or ``auto`` (the Gramian path where it applies and equals the Jacobian's)."""


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
        heads: str = "sum",
        path: str = "auto",
    ) -> None:
        super().__init__(tasks)
        if on not in ("parameters", "representation"):
            raise ValueError(f"on must be 'parameters' or 'representation', got {on!r}")
        if heads not in ("sum", "weighted"):
            raise ValueError(f"heads must be 'sum' or 'weighted', got {heads!r}")
        if heads == "weighted" and on == "parameters" and not hasattr(aggregator, "solved_weights"):
            raise ValueError("heads 'weighted' needs a method that keeps its solved weights")
        if path not in PATHS:
            raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
        self.aggregator = aggregator
        self.seed = int(seed)
        self.on = on
        self.loss_scale = loss_scale
        self.heads = heads
        self.path = path
        if path == "gramian" and not self.gramian_only:
            raise ValueError(
                "path 'gramian' needs a method whose weights depend on the Gramian only, on the "
                "shared parameters (not mgda_ub, adatask, or a Jacobian aggregator)"
            )
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        # the path decided (0: not yet, 1: jacobian, 2: gramian), checkpointed: a resumed run
        # takes the path the interrupted one had taken, so it continues bit-exactly
        self.register_buffer("route_code", torch.zeros((), dtype=torch.long))
        self._jacobian: Tensor | None = None  # summed over the window so far
        self._route: str | None = None  # the path taken: None (first call), probe, gramian, ...
        self._shared_ids: set[int] | None = None

    @property
    def wants_representation(self) -> bool:
        """Whether the trainable module must capture the trunk's outputs (``bundle.shared``)."""
        return self.on == "representation"

    @property
    def gramian_only(self) -> bool:
        """Whether the method's update is ``w(J Jᵀ) @ J`` on the shared parameters, with nothing
        else taken from ``J``: what the Gramian path needs."""
        return (
            self.on == "parameters"
            and isinstance(self.aggregator, Aggregator)
            and type(self).on_window is GradientWeighting.on_window  # AdaTask reads J itself
        )

    def gramian_engine(self, trunk: nn.Module) -> TrunkGramian | None:
        """For the trainable module, before a training forward: the trunk's Gramian engine of
        that forward when this weighting is on the Gramian path (from its second call on: the
        first one decides, on the Jacobian path), else None."""
        if self._route is None and int(self.route_code) == _ROUTES["gramian"]:
            self._route = "gramian"  # resumed after the probe chose it
        if self._route not in ("probe", "gramian"):
            return None
        engine = TrunkGramian(trunk)
        if self._shared_ids is not None and {id(p) for p in engine.parameters} != self._shared_ids:
            engine.release()
            self._leave_gramian("the trunk's parameters are not the shared parameters")
            return None
        return engine

    def _choose_route(self, accelerator: Any, params: list[nn.Parameter]) -> None:
        """At the first call: ``jacobian`` or ``probe`` (the Gramian path once one micro-batch
        has shown it equal to the Jacobian path)."""
        self._shared_ids = {id(p) for p in params}
        if self.path == "jacobian" or not self.gramian_only:
            self._set_route("jacobian")
            return
        if int(self.route_code) == _ROUTES["jacobian"]:  # resumed after leaving the Gramian path
            self._route = "jacobian"
            return
        processes = int(getattr(accelerator, "num_processes", 1))
        accum = int(getattr(accelerator, "gradient_accumulation_steps", 1))
        if processes > 1 or accum > 1:
            reason = (
                f"{processes} processes (the global batch's Gramian needs every process's "
                "gradients: the mean of per-process Gramians is not it)"
                if processes > 1
                else f"{accum} accumulation steps (the window's Gramian needs every "
                "micro-batch's gradients)"
            )
            if self.path == "gramian":
                raise ValueError(f"config key 'weighting.kwargs.path': 'gramian' with {reason}; "
                                 "use 'auto' or 'jacobian'")  # fmt: skip
            self._set_route("jacobian")
            return
        self._route = "probe"

    def bind_shared(self, shared: list[nn.Parameter]) -> None:
        """Remember the shared parameters (a resumed run on the Gramian path checks its trunk's
        parameters against them before its first forward)."""
        self._shared_ids = {id(p) for p in shared if p.requires_grad}

    def _set_route(self, route: str) -> None:
        """Take ``route`` (``jacobian`` or ``gramian``) from now on, and record it."""
        self._route = route
        self.route_code.fill_(_ROUTES[route])

    def _leave_gramian(self, reason: str) -> None:
        if self.path == "gramian":
            raise RuntimeError(f"config key 'weighting.kwargs.path': 'gramian' fails: {reason}")
        warnings.warn(f"weighting path auto: the Jacobian path ({reason})", RuntimeWarning,
                      stacklevel=3)  # fmt: skip
        self._set_route("jacobian")

    def _probe(self, engine_gramian: Tensor, gramian: Tensor) -> None:
        """The engine's Gramian against ``J Jᵀ`` on one micro-batch: equal (float rounding),
        the Gramian path from now on; not (a trunk that uses a module's parameters without
        calling it), the Jacobian path (``auto``) or an error (``gramian``)."""
        scale = float(gramian.diagonal().abs().max()) if gramian.numel() else 0.0
        same = torch.allclose(engine_gramian.to(gramian.dtype), gramian, rtol=1e-3,
                              atol=1e-5 * scale)  # fmt: skip
        if same:
            self._set_route("gramian")
        else:
            self._leave_gramian("the engine's Gramian differs from the Jacobian's")

    def _head_weights(self) -> list[float] | None:
        """The weights of the task losses in the heads' backward: None (the plain sum) or the
        method's solved weights (``heads="weighted"``: Nash-MTL's α, as its reference)."""
        if self.heads != "weighted" or self.on != "parameters":
            return None
        return self.aggregator.solved_weights().tolist()

    def _heads_total(self, losses: list[Tensor | None], joint: Tensor | None) -> Tensor:
        """``Σ_t h_t L_t + joint`` with ``h`` from :meth:`_head_weights` (ones by default)."""
        return _weighted(self._head_weights() or [1.0] * len(losses), losses, joint)

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
        if self._route is None:
            self._choose_route(accelerator, params)
        engine = bundle.gramian_engine if self._route in ("probe", "gramian") else None
        engine_gramian = None
        if engine is not None:
            try:
                engine_gramian = engine.gramian(losses, loss_scale)
            except (RuntimeError, ValueError) as err:  # e.g. no hooked module was called
                self._leave_gramian(f"the engine failed: {str(err).splitlines()[0]}")
        if engine_gramian is not None and self._route == "gramian":
            return self._backward_gramian(engine_gramian, losses, joint, params, accelerator,
                                          loss_scale)  # fmt: skip
        rows = [_flat_grad(loss, loss_scale / accum, params, dtype) for loss in [*losses, joint]]
        jacobian = torch.stack(rows) / loss_scale  # unscaled, float32 or wider
        self._jacobian = jacobian if self._jacobian is None else self._jacobian + jacobian

        saved = [None if p.grad is None else p.grad.detach().clone() for p in params]
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
            if engine_gramian is not None:
                self._probe(engine_gramian, gramian)
            if isinstance(self.aggregator, JacobianAggregator):  # e.g. GradDrop, GradVac
                direction = self._direction(task_jacobian, gramian)
                update = (direction.to(dtype) + joint_grad) * loss_scale
                logs = self._logs(gramian, getattr(self.aggregator, "last_weights", None))
            else:
                weights = self._weights(gramian, accelerator)
                update = (weights.to(dtype) @ task_jacobian + joint_grad) * loss_scale
                logs = self._logs(gramian, weights)
        # after the window is combined: Nash-MTL's heads take this window's solved α
        accelerator.backward(self._heads_total(losses, joint))
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

    def _backward_gramian(
        self,
        gramian: Tensor,
        losses: list[Tensor | None],
        joint: Tensor | None,
        params: list[nn.Parameter],
        accelerator: Any,
        loss_scale: float,
    ) -> dict[str, float]:
        """The Gramian path (one process, no accumulation): ``w`` from the engine's Gramian,
        then ``∇_θs (Σ_t w_t L_t + joint)`` (one backward) for the shared parameters and the
        heads' backward of :meth:`_heads_total`: the Jacobian path's gradients, without ``J``."""
        weights = self._weights(gramian, accelerator)
        shared_total = _weighted(weights.tolist(), losses, joint)
        grads = torch.autograd.grad(shared_total * loss_scale, params, retain_graph=True,
                                    allow_unused=True)  # fmt: skip
        saved = [None if p.grad is None else p.grad.detach().clone() for p in params]
        accelerator.backward(self._heads_total(losses, joint))
        with torch.no_grad():
            for p, before, grad in zip(params, saved, grads, strict=True):
                new = before if grad is None else grad if before is None else before + grad
                if new is None:
                    p.grad = None
                elif p.grad is None:
                    p.grad = new.clone()
                else:
                    p.grad.copy_(new)
        return self._logs(gramian, weights)

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
        solved = getattr(self.aggregator, "solved_weights", None)
        if weights is not None and solved is not None:  # Nash-MTL: α, and the clipped α
            alpha = solved().to(gramian.device, gramian.dtype) * (gramian.diagonal() > 0)
            logs = {f"shared_weight/{t}": w
                    for t, w in zip(self.tasks, weights.tolist(), strict=True)}  # fmt: skip
            weights = alpha
        if weights is not None:
            logs |= {f"weight/{t}": w for t, w in zip(self.tasks, weights.tolist(), strict=True)}
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


def _weighted(weights: list[float], losses: list[Tensor | None], joint: Tensor | None) -> Tensor:
    """``Σ_t w_t L_t + joint`` over the losses that are present."""
    total: Tensor | None = joint
    for w, loss in zip(weights, losses, strict=True):
        if loss is not None:
            total = w * loss if total is None else total + w * loss
    assert total is not None, "empty LossBundle"
    return total


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
def mgda(
    tasks: list[str],
    scale: str = "mean",
    tolerance: float = 1e-6,
    max_iter: int = 1000,
    path: str = "auto",
    seed: int = 0,
) -> Weighting:
    """MGDA on the shared parameters (Sener & Koltun, NeurIPS 2018): the min-norm point of the
    convex hull of the per-task gradients, solved exactly (``tolerance``: relative accuracy of
    the direction, ``max_iter``: the solver's cap; :mod:`unirep.weighting.min_norm`).
    ``scale="sum"`` multiplies the convex weights by T."""
    aggregator = build_aggregator("mgda", len(tasks), scale=scale, tolerance=tolerance,
                                  max_iter=max_iter)  # fmt: skip
    return GradientWeighting(tasks, aggregator, seed, path=path)


@WEIGHTINGS.register("mgda_ub")
def mgda_ub(
    tasks: list[str], scale: str = "mean", tolerance: float = 1e-6, max_iter: int = 1000,
    seed: int = 0,
) -> Weighting:  # fmt: skip
    """MGDA-UB (Sener & Koltun, NeurIPS 2018 §3.3): MGDA on the gradients with respect to the
    shared representation (the trunk's output), one backward through the trunk; the same exact
    solver as ``mgda``."""
    aggregator = build_aggregator("mgda", len(tasks), scale=scale, tolerance=tolerance,
                                  max_iter=max_iter)  # fmt: skip
    return GradientWeighting(tasks, aggregator, seed, on="representation")


@WEIGHTINGS.register("pcgrad")
def pcgrad(tasks: list[str], seed: int = 0, path: str = "auto") -> Weighting:
    """PCGrad (Yu et al., NeurIPS 2020): conflicting gradients projected onto each other's
    normal plane, in random task orders, then summed."""
    return GradientWeighting(tasks, build_aggregator("pcgrad", len(tasks)), seed, path=path)


@WEIGHTINGS.register("cagrad")
def cagrad(
    tasks: list[str],
    c: float = 0.4,
    scale: str = "sum",
    rescale: int = 1,
    seed: int = 0,
    path: str = "auto",
) -> Weighting:
    """CAGrad (Liu et al., NeurIPS 2021), ``c = 0.4`` (the reference's NYUv2 / Cityscapes); the
    defaults give the reference code's update ``T d / (1 + c²)`` (see the aggregator)."""
    aggregator = build_aggregator("cagrad", len(tasks), c=c, scale=scale, rescale=rescale)
    return GradientWeighting(tasks, aggregator, seed, path=path)


@WEIGHTINGS.register("imtl")
def imtl(
    tasks: list[str], mode: str = "h", scale: str = "mean", seed: int = 0, path: str = "auto"
) -> Weighting:
    """IMTL (Liu et al., ICLR 2021): ``mode="g"`` (gradient balance, closed form), ``"l"`` (loss
    balance, learned ``e^{s} L − s``, the gradients summed) or ``"h"`` (both: IMTL-L's scaled
    losses, then IMTL-G on their gradients)."""
    if mode not in ("g", "l", "h"):
        raise ValueError(f"imtl mode must be 'g', 'l' or 'h', got {mode!r}")
    if mode == "l":
        return IMTLL(tasks)
    scale_losses = IMTLLossScale(tasks) if mode == "h" else None
    aggregator = build_aggregator("imtl_g", len(tasks), scale=scale)
    return GradientWeighting(tasks, aggregator, seed, loss_scale=scale_losses, path=path)


@WEIGHTINGS.register("nash_mtl")
def nash_mtl(
    tasks: list[str],
    update_weights_every: int = 1,
    optim_niter: int = 20,
    max_norm: float = 1.0,
    heads: str = "weighted",
    seed: int = 0,
    path: str = "auto",
) -> Weighting:
    """Nash-MTL (Navon et al., ICML 2022): the bargaining solution ``α_i (Gα)_i = 1``, solved
    every ``update_weights_every`` steps; warns on every solver failure. ``heads="weighted"``
    (the reference): the heads get ``Σ α_t L_t`` with the solved ``α`` (the shared parameters
    ``αᵀJ``, scaled to norm ``≤ max_norm``); ``"sum"``: the heads get ``Σ L_t`` (unirep < 0.6)."""
    aggregator = build_aggregator(
        "nash_mtl", len(tasks), update_weights_every=update_weights_every,
        optim_niter=optim_niter, max_norm=max_norm,
    )  # fmt: skip
    return GradientWeighting(tasks, aggregator, seed, heads=heads, path=path)


@WEIGHTINGS.register("aligned_mtl")
def aligned_mtl(
    tasks: list[str], scale_mode: str = "min", scale: str = "mean", seed: int = 0,
    path: str = "auto",
) -> Weighting:  # fmt: skip
    """Aligned-MTL (Senushkin et al., CVPR 2023): the gradient matrix's condition number made 1;
    averaged as torchjd (``scale="sum"``: summed, as the original code)."""
    aggregator = build_aggregator("aligned_mtl", len(tasks), scale_mode=scale_mode, scale=scale)
    return GradientWeighting(tasks, aggregator, seed, path=path)


@WEIGHTINGS.register("upgrad")
def upgrad(tasks: list[str], scale: str = "mean", seed: int = 0, path: str = "auto") -> Weighting:
    """UPGrad (Quinton & Rey, 2024): projections onto the dual cone, averaged (``scale="sum"``:
    summed)."""
    aggregator = build_aggregator("upgrad", len(tasks), scale=scale)
    return GradientWeighting(tasks, aggregator, seed, path=path)
