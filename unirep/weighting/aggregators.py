"""Gradient aggregators: from the per-task gradients' Gramian to the weights of their combination.

Every gradient method of the literature that unirep ships combines the per-task gradients
``J`` (``[T, P]``, row ``t`` = ``∇ L_t``) as ``d = w @ J`` with weights ``w`` (``[T]``) that depend
on ``J`` only through its Gramian ``M = J Jᵀ`` (``[T, T]``). An :class:`Aggregator` is that map
``M ↦ w``; :func:`aggregate` applies one to a Jacobian, for people who want to check the maths::

    from unirep.weighting import aggregate
    d = aggregate("mgda", torch.stack([g1, g2]))   # [P], the min-norm point of the hull

Where each comes from (torchjd 0.18, ``torchjd.aggregation``, unless said):

========== ====================================================== ===========================
name        method                                                  weights from
========== ====================================================== ===========================
sum         unitary scalarisation (Kurin et al. 2022)               ones
mean        equal weighting 1/T                                      ones / T
mgda        MGDA, min-norm point (Sener & Koltun 2018)              ours (:class:`MGDA`)
pcgrad      PCGrad (Yu et al. 2020)                                  ``PCGradWeighting``
cagrad      CAGrad (Liu et al. 2021), needs ``unirep[solvers]``      ``CAGradWeighting``
imtl_g      IMTL-G (Liu et al. 2021)                                 ``IMTLGWeighting``
aligned_mtl Aligned-MTL (Senushkin et al. 2023)                      ``AlignedMTLWeighting``
upgrad      UPGrad (Quinton & Rey 2024), needs ``unirep[solvers]``   ``UPGradWeighting``
nash_mtl    Nash-MTL (Navon et al. 2022), needs ``unirep[solvers]``  ours (:class:`NashMTL`)
========== ====================================================== ===========================

Nash-MTL is ours because torchjd's keeps its state in NumPy (not checkpointed) and silently keeps
the previous weights when its solver fails; ours keeps the state in buffers (resumed exactly) and
warns on every failure.

Scale. ``mgda``, ``imtl_g``, ``cagrad`` and ``mean`` give weights summing to 1 (a convex
combination, ~1/T of the ``sum`` step under SGD); ``upgrad`` and ``aligned_mtl`` (torchjd's, with
its default preference vector ``1/T``) are on that mean scale too (``upgrad`` is the mean when no
gradients conflict). ``scale="sum"`` multiplies their weights by ``T`` (the number of tasks
present): what the nash-mtl and CAGrad reference code do "to match the sum loss", and the original
Aligned-MTL code's ``B.sum(0)``. ``pcgrad`` is on the scale of the sum already (no ``scale``).

The torchjd weightings are invariant to a uniform scaling of the Gramian, but some compare it with
absolute thresholds (CAGrad's and UPGrad's ``norm_eps = 1e-4`` on ``trace(J Jᵀ)``: below it,
torchjd's CAGrad returns a zero update and UPGrad the mean). So they are given ``J Jᵀ / trace``:
the same weights, whatever the gradients' magnitude.
"""

from __future__ import annotations

import abc
import copy
import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from unirep.errors import ConfigError
from unirep.registry import Registry

AGGREGATORS: Registry[Aggregator] = Registry("gradient aggregator")
"""``AGGREGATORS.build(name, num_tasks=T, **kwargs)``."""

SOLVERS_EXTRA = 'pip install "unirep[solvers]"'


class Aggregator(nn.Module, abc.ABC):
    """``forward(gramian [T, T]) -> weights [T]``: the combination ``d = weights @ J``.

    State (e.g. Nash-MTL's previous weights) lives in buffers, so it is checkpointed with the
    weighting that owns the aggregator. Inputs are float32 or float64; the weights have the
    Gramian's dtype and device.
    """

    def __init__(self, num_tasks: int, scale: str = "mean") -> None:
        super().__init__()
        if scale not in ("mean", "sum"):
            raise ValueError(f"scale must be 'mean' or 'sum', got {scale!r}")
        self.num_tasks = int(num_tasks)
        self.scale = scale

    @abc.abstractmethod
    def weights(self, gramian: Tensor) -> Tensor:
        """The weights of all ``num_tasks`` gradients (Gramian ``[num_tasks, num_tasks]``)."""

    def subset_weights(self, gramian: Tensor, index: Tensor) -> Tensor:
        """The weights of the gradients ``index`` of the full set, from their Gramian
        ``[k, k]`` (stateless methods: the same method built for ``k`` tasks)."""
        sub = copy.copy(self)
        sub.num_tasks = len(index)
        return sub.weights(gramian)

    def forward(self, gramian: Tensor, present: Tensor | None = None) -> Tensor:
        """Weights ``[T]`` of the gradients whose Gramian is ``gramian`` (``[T, T]``); with
        ``present`` (``[T]`` bool), the absent gradients get 0 and are left out of the
        combination (a zero gradient would pin MGDA's min-norm point to 0)."""
        if gramian.shape != (self.num_tasks, self.num_tasks):
            raise ValueError(
                f"expected a [{self.num_tasks}, {self.num_tasks}] Gramian, got "
                f"{list(gramian.shape)}"
            )
        if present is None or bool(present.all()):
            w, count = self.weights(gramian), self.num_tasks
        else:
            index = present.nonzero().flatten()
            w = torch.zeros(self.num_tasks, dtype=gramian.dtype, device=gramian.device)
            count = len(index)
            if count:
                w[index] = self.subset_weights(gramian[index][:, index], index)
        return w * count if self.scale == "sum" else w


class JacobianAggregator(nn.Module, abc.ABC):
    """``forward(jacobian [T, n], present [T] bool) -> direction [n]``: a method whose update is
    not a combination ``w @ J`` the Gramian decides (GradDrop's per-coordinate sign masks) or that
    needs the gradients themselves (GradVac's per-pair cosine targets). State lives in buffers,
    checkpointed with the weighting. :class:`~unirep.weighting.gradient.GradientWeighting` hands
    it the process-averaged Jacobian, so every process computes the same direction."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = int(num_tasks)

    @abc.abstractmethod
    def combine(self, jacobian: Tensor) -> Tensor:
        """The update direction ``[n]`` of the task gradients ``jacobian`` ``[k, n]`` (the
        present tasks' rows, in task order)."""

    def forward(self, jacobian: Tensor, present: Tensor | None = None) -> Tensor:
        """The direction ``[n]`` from the rows of the present tasks (all when ``present`` is
        None); zeros when no task is present."""
        if jacobian.shape[0] != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} gradient rows, got {jacobian.shape[0]}")
        if present is not None and not bool(present.all()):
            if not bool(present.any()):
                return torch.zeros_like(jacobian[0])
            jacobian = jacobian[present]
        return self.combine(jacobian)


class _TorchJD(Aggregator):
    """A torchjd Gramian weighting (``torchjd.aggregation.<Name>Weighting``), given the Gramian
    divided by its trace (the weights do not change; torchjd's absolute thresholds then do not
    bite on small gradients), its weights times ``factor``."""

    mean_scale = True  # weights on the scale of the mean: ``scale`` applies

    def __init__(
        self, num_tasks: int, weighting: nn.Module, scale: str = "mean", factor: float = 1.0
    ) -> None:
        super().__init__(num_tasks, scale if self.mean_scale else "mean")
        self.inner = weighting
        self.factor = float(factor)

    def weights(self, gramian: Tensor) -> Tensor:
        trace = gramian.diagonal().sum()
        if bool(trace > 0) and bool(torch.isfinite(trace)):
            gramian = gramian / trace
        weights = self.inner(gramian).to(device=gramian.device, dtype=gramian.dtype)
        return weights * self.factor if self.factor != 1.0 else weights


def _needs_solvers(method: str, build: Any) -> Any:
    try:
        return build()
    except ImportError as err:
        raise ConfigError(
            f"weighting {method!r} needs the optional solvers (cvxpy, ecos, clarabel, quadprog): "
            f"{SOLVERS_EXTRA}"
        ) from err


@AGGREGATORS.register("sum")
class SumAggregator(Aggregator):
    """``w = 1``: the gradient of ``Σ_t L_t``."""

    def weights(self, gramian: Tensor) -> Tensor:
        return torch.ones(self.num_tasks, dtype=gramian.dtype, device=gramian.device)


@AGGREGATORS.register("mean")
class MeanAggregator(Aggregator):
    """``w = 1/T`` (``scale="sum"`` gives ``sum``)."""

    def weights(self, gramian: Tensor) -> Tensor:
        return torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=gramian.dtype,
                          device=gramian.device)  # fmt: skip


@AGGREGATORS.register("mgda")
class MGDA(Aggregator):
    """MGDA: ``w = argmin_{w ∈ Δ_T} ‖wᵀJ‖²`` (Sener & Koltun, NeurIPS 2018), solved exactly by
    Wolfe's min-norm-point algorithm on the Gramian (:func:`~unirep.weighting.min_norm.
    min_norm_weights`): the direction within ``tolerance`` (relative) of the exact min-norm
    point, stopped by its duality gap, at most ``max_iter`` corral changes (a
    ``RuntimeWarning`` when that cap stops it). The reference's Frank–Wolfe (and torchjd's
    ``MGDAWeighting``, which unirep used before 0.6) stops at a fixed loose threshold."""

    def __init__(
        self, num_tasks: int, scale: str = "mean", tolerance: float = 1e-6, max_iter: int = 1000
    ) -> None:
        super().__init__(num_tasks, scale)
        if not (isinstance(tolerance, int | float) and 0 < tolerance < 1):
            raise ValueError(f"mgda tolerance must be a number in (0, 1), got {tolerance!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"mgda max_iter must be an integer >= 1, got {max_iter!r}")
        self.tolerance = float(tolerance)
        self.max_iter = int(max_iter)

    def weights(self, gramian: Tensor) -> Tensor:
        from unirep.weighting.min_norm import min_norm_weights

        weights, info = min_norm_weights(gramian, self.tolerance, self.max_iter)
        if not info["converged"]:
            warnings.warn(
                f"mgda: the min-norm solver stopped at max_iter={self.max_iter} with a duality "
                f"gap of {info['gap']:.2e} (of the largest squared gradient norm)",
                RuntimeWarning,
                stacklevel=2,
            )
        return weights


class _Unscaled(_TorchJD):
    mean_scale = False


@AGGREGATORS.register("pcgrad")
def pcgrad(num_tasks: int) -> Aggregator:
    """PCGrad: the sum of the projected gradients (Yu et al., NeurIPS 2020, Alg. 1); the task
    orders come from the global RNG (the owning weighting seeds it)."""
    from torchjd.aggregation import PCGradWeighting

    return _Unscaled(num_tasks, PCGradWeighting())


@AGGREGATORS.register("cagrad")
def cagrad(
    num_tasks: int, c: float = 0.4, scale: str = "sum", rescale: int = 1, norm_eps: float = 1e-4
) -> Aggregator:
    """CAGrad (Liu et al., NeurIPS 2021): ``d = g₀ + (√φ/‖g_w‖) g_w`` with ``g₀`` the mean
    gradient, ``φ = c²‖g₀‖²`` and ``w`` the dual solution (``min_{w ∈ Δ} g_wᵀg₀ + √φ‖g_w‖``);
    ``rescale`` divides ``d`` by ``1 + c²`` (1, the reference code's default and runs), ``1 + c``
    (2) or nothing (0); ``c = 0.4`` as the reference's NYUv2 / Cityscapes runs, ``scale="sum"``
    as its code (× T): the defaults give the reference's ``T d / (1 + c²)``. ``norm_eps``:
    torchjd's, on the trace-normalised Gramian (below it, ``‖g_w‖ ≈ 0``, the update is zero).
    Needs ``unirep[solvers]``."""
    if rescale not in (0, 1, 2):
        raise ValueError(f"cagrad rescale must be 0, 1 or 2, got {rescale!r}")
    if not (isinstance(c, int | float) and 0 <= c < float("inf")):
        raise ValueError(f"cagrad c must be a finite number >= 0 (0: gradient descent), got {c!r}")
    factor = (1.0, 1.0 / (1.0 + c**2), 1.0 / (1.0 + c))[rescale]

    def build() -> Aggregator:
        from torchjd.aggregation import CAGradWeighting

        return _TorchJD(num_tasks, CAGradWeighting(c=c, norm_eps=norm_eps), scale, factor)

    return _needs_solvers("cagrad", build)


@AGGREGATORS.register("imtl_g")
def imtl_g(num_tasks: int, scale: str = "mean") -> Aggregator:
    """IMTL-G (Liu et al., ICLR 2021): weights summing to 1 that give the combined gradient equal
    projections on every task's unit gradient."""
    from torchjd.aggregation import IMTLGWeighting

    return _TorchJD(num_tasks, IMTLGWeighting(), scale)


@AGGREGATORS.register("aligned_mtl")
def aligned_mtl(num_tasks: int, scale_mode: str = "min", scale: str = "mean") -> Aggregator:
    """Aligned-MTL (Senushkin et al., CVPR 2023): the gradients' stable principal directions,
    rescaled by the smallest (``scale_mode="min"``), median or RMSE singular value, averaged
    (torchjd's; ``scale="sum"`` sums them, as the original code's ``B.sum(0)``)."""
    from torchjd.aggregation import AlignedMTLWeighting

    if scale_mode not in ("min", "median", "rmse"):
        raise ValueError(f"aligned_mtl scale_mode must be min, median or rmse, got {scale_mode!r}")
    return _TorchJD(num_tasks, AlignedMTLWeighting(scale_mode=scale_mode), scale)


@AGGREGATORS.register("upgrad")
def upgrad(num_tasks: int, scale: str = "mean") -> Aggregator:
    """UPGrad (Quinton & Rey, 2024): each gradient projected onto the dual cone of all, then
    averaged (``scale="sum"``: summed); never conflicts with any task. Needs ``unirep[solvers]``
    (quadprog)."""

    def build() -> Aggregator:
        from torchjd.aggregation import UPGradWeighting

        return _TorchJD(num_tasks, UPGradWeighting(), scale)

    return _needs_solvers("upgrad", build)


@AGGREGATORS.register("nash_mtl")
class NashMTL(Aggregator):
    """Nash-MTL (Navon et al., ICML 2022, Alg. 1; the reference's ``NashMTL`` weight method).

    Solves ``α_i (J Jᵀ α)_i = 1`` (``α > 0``) by up to ``optim_niter`` convex-concave
    iterations on the Frobenius-normalised Gramian ``M = J Jᵀ / n`` (``n = ‖J Jᵀ‖_F``), each the
    conic problem ``min Σ(Mα) + φ̃(α)/n`` s.t. ``log(α_i n) + log (Mα)_i ≥ 0`` solved by ECOS
    (``max_iters=100``, warm start), where ``φ̃`` linearises ``Σ log α_i + log (Mα)_i`` at the
    previous iterate; it stops when ``‖Mα − 1/α‖ < 1e-3`` or ``α`` moves less than ``1e-6``. This
    is the reference's ``NashMTL`` problem, step for step (as torchjd's copy of it). With
    ``max_norm > 0``, ``α`` is scaled down so that ``‖αᵀJ‖ ≤ max_norm`` (the reference clips the
    shared gradient norm to 1).

    ``update_weights_every = k`` solves on every k-th call and reuses the previous ``α`` in
    between. When ECOS fails or returns nothing, the last iterate (the previous call's ``α`` when
    the first solve fails) is kept, as the reference does, **and a ``RuntimeWarning`` says so**
    (the reference code keeps it silently); :attr:`failures` counts them, and the calls whose
    Gramian is zero or not finite (nothing solved, ``α`` kept, a warning too). With some tasks
    absent (``present``), the problem of the present tasks is solved, warm-started from their
    ``α`` (one task: ``α = 1/‖g‖``, no solver).

    State (buffers, checkpointed): the previous ``α`` (``[T]``, initially ones), the call count and
    the failure count.
    """

    alpha: Tensor
    calls: Tensor
    failures: Tensor

    def __init__(
        self,
        num_tasks: int,
        update_weights_every: int = 1,
        optim_niter: int = 20,
        max_norm: float = 1.0,
    ) -> None:
        super().__init__(num_tasks)
        if update_weights_every < 1 or optim_niter < 1 or max_norm < 0:
            raise ValueError(
                "nash_mtl needs update_weights_every >= 1, optim_niter >= 1 and max_norm >= 0"
            )
        _needs_solvers("nash_mtl", self._import)
        self.update_weights_every = int(update_weights_every)
        self.optim_niter = int(optim_niter)
        self.max_norm = float(max_norm)
        self.register_buffer("alpha", torch.ones(num_tasks, dtype=torch.float64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("failures", torch.zeros((), dtype=torch.long))
        self._problem: Any = None

    @staticmethod
    def _import() -> Any:
        import cvxpy
        import ecos  # noqa: F401  (cvxpy >= 1.6 no longer bundles it)

        return cvxpy

    def _build(self) -> None:
        import numpy as np

        cp = self._import()
        n = self.num_tasks
        self._alpha = cp.Variable(shape=(n,), nonneg=True)
        self._prev = cp.Parameter(shape=(n,), value=np.ones(n))
        self._gram = cp.Parameter(shape=(n, n), value=np.eye(n))
        self._norm = cp.Parameter(shape=(1,), value=np.ones(1))
        g_alpha = self._gram @ self._alpha
        prev_tag = 1 / self._prev + (1 / (self._gram @ self._prev)) @ self._gram
        phi = prev_tag @ (self._alpha - self._prev)
        constraints = [
            -cp.log(a * self._norm) - cp.log(ga) <= 0
            for a, ga in zip(self._alpha, g_alpha, strict=True)
        ]
        self._problem = cp.Problem(cp.Minimize(cp.sum(g_alpha) + phi / self._norm), constraints)

    def _solve(self, gram: Any, norm: float) -> Any:
        import numpy as np

        cp = self._import()
        if self._problem is None:
            self._build()
        self._gram.value = gram
        self._norm.value = np.array([norm])
        alpha = self.alpha.detach().to("cpu", torch.float64).numpy().copy()
        for _ in range(self.optim_niter):
            self._alpha.value = alpha
            self._prev.value = alpha
            reason = ""
            try:
                with warnings.catch_warnings():  # "not DPP": only means no faster re-solves
                    warnings.filterwarnings("ignore", message=".*not DPP.*")
                    self._problem.solve(solver=cp.ECOS, warm_start=True, max_iters=100)
            except (cp.SolverError, ValueError) as err:
                reason = f"{type(err).__name__}: {err}"
            found = self._alpha.value
            if reason or found is None or not np.all(np.isfinite(found)):
                self.failures += 1
                warnings.warn(
                    f"nash_mtl: the ECOS solver failed at call {int(self.calls)} "
                    f"({reason or 'status ' + str(self._problem.status)}); keeping the weights "
                    f"{np.round(alpha, 4).tolist()} ({int(self.failures)} failures so far)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return alpha
            done = (
                np.linalg.norm(gram @ alpha - 1 / (alpha + 1e-10)) < 1e-3
                or np.linalg.norm(found - alpha) < 1e-6
            )
            if done:
                break
            alpha = found
        return alpha

    def solved_weights(self) -> Tensor:
        """The last solved ``α`` (``[T]``, float64, before the ``max_norm`` scaling; ones before
        the first solve): what the reference back-propagates into the task heads."""
        return self.alpha.detach().clone()

    def subset_weights(self, gramian: Tensor, index: Tensor) -> Tensor:
        """Solved for the present tasks alone, warm-started from (and updating) their ``α``
        (a problem of that size, built on first use and kept for the next such call)."""
        index = index.to(self.alpha.device)
        key = tuple(index.tolist())
        subs = self.__dict__.setdefault("_subsets", {})
        sub = subs.get(key)
        if sub is None:
            sub = subs[key] = NashMTL(len(key), self.update_weights_every, self.optim_niter,
                                      self.max_norm)  # fmt: skip
        sub.alpha.copy_(self.alpha[index])
        sub.calls.copy_(self.calls)
        sub.failures.copy_(self.failures)
        w = sub.weights(gramian)
        self.alpha[index] = sub.alpha.to(self.alpha.device)
        self.calls.copy_(sub.calls)
        self.failures.copy_(sub.failures)
        return w

    def weights(self, gramian: Tensor) -> Tensor:
        gram = gramian.detach().to("cpu", torch.float64)
        if int(self.calls) % self.update_weights_every == 0:
            norm = float(torch.linalg.matrix_norm(gram))  # Frobenius
            if norm > 0 and math.isfinite(norm) and self.num_tasks == 1:
                self.alpha.fill_(1.0 / math.sqrt(norm))  # α (Gα) = 1 in closed form
            elif norm > 0 and math.isfinite(norm):
                self.alpha.copy_(torch.from_numpy(self._solve((gram / norm).numpy(), norm)))
            else:
                self.failures += 1
                warnings.warn(
                    f"nash_mtl: the task gradients are {'zero' if norm == 0 else 'not finite'} "
                    f"at call {int(self.calls)}; keeping the previous weights "
                    f"({int(self.failures)} failures so far)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.calls += 1
        w = self.alpha.detach().to("cpu", torch.float64)
        if self.max_norm > 0:
            length = (w @ gram @ w).clamp_min(0).sqrt()
            if length > self.max_norm:
                w = w * (self.max_norm / length)
        return w.to(device=gramian.device, dtype=gramian.dtype)


def build_aggregator(name: str, num_tasks: int, **kwargs: Any) -> Aggregator:
    """The aggregator registered as ``name`` for ``num_tasks`` tasks."""
    return AGGREGATORS.build(name, num_tasks=num_tasks, **kwargs)


def aggregate(name: str, jacobian: Tensor, **kwargs: Any) -> Tensor:
    """The combined direction ``[P]`` of the per-task gradients ``jacobian`` (``[T, P]``, row
    ``t`` = ``∇ L_t``) by the gradient method ``name`` (see :data:`AGGREGATORS`), e.g.
    ``aggregate("pcgrad", J)`` or ``aggregate("cagrad", J, c=0.4)``. Computed in float64 when
    the input is float64, else float32."""
    if jacobian.dim() != 2:
        raise ValueError(f"jacobian must be [T, P], got shape {list(jacobian.shape)}")
    matrix = jacobian if jacobian.dtype == torch.float64 else jacobian.float()
    aggregator = build_aggregator(name, jacobian.shape[0], **kwargs)
    if isinstance(aggregator, JacobianAggregator):  # GradDrop, GradVac, ...: the rows themselves
        return aggregator(matrix)
    return aggregator(matrix @ matrix.T) @ matrix
