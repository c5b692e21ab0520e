"""torchjd's newer aggregators, wrapped as unirep aggregators with their state in our buffers.

Each class here calls torchjd 0.18's own implementation (``torchjd.aggregation``) for the
computation. What the wrappers add: the state torchjd keeps in attributes (registered as ``None``
buffers, so absent from a fresh module's ``state_dict``) lives in buffers of fixed shape, loaded
into the torchjd object before each call and read back after it (checkpointed, a resume is
bit-exact; every process holds the same, as every process calls with the process-averaged
Jacobian); absent tasks (``present``) are handled per method; the torchjd object sits outside the
module tree (``_inner``), holding no state between calls.

========= ============================================== ========================== =============
name       method                                          torchjd                    input
========= ============================================== ========================== =============
gradvac    GradVac (Wang et al., ICLR 2021)                ``GradVacWeighting``       Gramian
fairgrad   FairGrad (Ban & Ji, ICML 2024)                  ``FairGradWeighting``      Gramian
modo       MoDo (Chen et al., NeurIPS 2023 / JMLR 2024)    ``MoDoWeighting``          Gramian
sdmgrad    SDMGrad (Xiao et al., NeurIPS 2023)             ``SDMGradWeighting``       Gramian
dualproj   DualProj (GEM's projection, Lopez-Paz 2017)     ``DualProjWeighting``      Gramian
krum       (Multi-)Krum (Blanchard et al., NeurIPS 2017)   ``KrumWeighting``          Gramian
pcd        PCD (Varam et al., TMLR 2026)                   ``PCDWeighting``           Gramian
cr_mogm    CR-MOGM (Zhou et al., NeurIPS 2022)             ``CRMOGMWeighting``        Gramian
graddrop   GradDrop (Chen et al., NeurIPS 2020)            ``GradDrop``               Jacobian
trimmed_mean trimmed mean (Yin et al., ICML 2018)          ``TrimmedMean``            Jacobian
config     ConFIG (Liu et al., ICLR 2025)                  ``ConFIG``                 Jacobian
excess_mtl ExcessMTL (He et al., ICML 2024)                ``ExcessMTLWeighting``     Jacobian
========= ============================================== ========================== =============

The Gramian is handed over as it is (not divided by its trace as :class:`_TorchJD` does) where a
method is not invariant to the gradients' scale (FairGrad, MoDo; GradVac's ``eps`` as the
reference), and trace-normalised where it is (DualProj, Krum).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from unirep.weighting.aggregators import (
    AGGREGATORS,
    Aggregator,
    JacobianAggregator,
    _needs_solvers,
    _TorchJD,
    build_aggregator,
)


def _hold(owner: nn.Module, inner: Any) -> None:
    """Keep the torchjd object out of the module tree (no state of its own in ``state_dict``)."""
    owner.__dict__["_inner"] = inner


def _check(name: str, ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


class _RawTorchJD(_TorchJD):
    """A torchjd Gramian weighting given the Gramian as it is (its result is scale-dependent)."""

    def weights(self, gramian: Tensor) -> Tensor:
        weights = self.inner(gramian).to(device=gramian.device, dtype=gramian.dtype)
        return weights * self.factor if self.factor != 1.0 else weights


class _RawUnscaled(_RawTorchJD):
    mean_scale = False


# ---------------------------------------------------------------------------------------------
# Stateless Gramian weightings


@AGGREGATORS.register("fairgrad")
def fairgrad(num_tasks: int, alpha: float = 1.0, max_iters: int | None = None) -> Aggregator:
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, Eq. 4):
    ``w`` solves ``G w = w^{-1/α}`` (``w ≥ 0``) by ``scipy.optimize.least_squares`` from
    ``1/T``; ``d = wᵀJ`` (neither mean nor sum scale: the solution's own). ``alpha`` 1.0 (LibMTL's
    ``FairGrad_alpha`` and the official runs' default; α = 0 gives ``1/T``), ``max_iters`` None
    (scipy's ``100·T``, as LibMTL and the official code). The raw Gramian: ``w`` scales as
    ``‖G‖^{-α/(1+α)}``."""
    _check(
        "fairgrad",
        isinstance(alpha, int | float) and alpha >= 0,
        f"alpha must be >= 0, got {alpha!r}",
    )
    _check("fairgrad", max_iters is None or (isinstance(max_iters, int) and max_iters >= 1),
           f"max_iters must be None or an integer >= 1, got {max_iters!r}")  # fmt: skip

    def build() -> Aggregator:
        from torchjd.aggregation import FairGradWeighting

        return _RawUnscaled(num_tasks, FairGradWeighting(alpha=float(alpha), max_iters=max_iters))

    return _needs_solvers("fairgrad", build)


@AGGREGATORS.register("dualproj")
def dualproj(num_tasks: int, scale: str = "mean") -> Aggregator:
    """DualProj (torchjd; the projection of Lopez-Paz & Ranzato's GEM, NeurIPS 2017, Eq. 11): the
    mean gradient projected onto the dual cone of the task gradients (it then conflicts with no
    task), mean scale (``scale="sum"``: × T). Needs ``unirep[solvers]`` (quadprog)."""

    def build() -> Aggregator:
        from torchjd.aggregation import DualProjWeighting

        return _TorchJD(num_tasks, DualProjWeighting(), scale)

    return _needs_solvers("dualproj", build)


@AGGREGATORS.register("krum")
class KrumAggregator(_TorchJD):
    """(Multi-)Krum (Blanchard et al., NeurIPS 2017): the ``n_selected`` gradients with the
    smallest sum of distances to their ``T − n_byzantine − 2`` nearest others, averaged (mean
    scale; ``scale="sum"``: × T). Krum needs ``n_byzantine + 3`` gradients: with fewer (tasks
    present, or the aggregator built for fewer tasks, which the ``krum`` weighting refuses) the
    gradients are averaged."""

    def __init__(
        self, num_tasks: int, n_byzantine: int = 0, n_selected: int = 1, scale: str = "mean"
    ) -> None:
        from torchjd.aggregation import KrumWeighting

        for key, value, low in (("n_byzantine", n_byzantine, 0), ("n_selected", n_selected, 1)):
            _check("krum", isinstance(value, int) and not isinstance(value, bool) and value >= low,
                   f"{key} must be an integer >= {low}, got {value!r}")  # fmt: skip
        super().__init__(num_tasks, KrumWeighting(n_byzantine, n_selected), scale)
        self.n_byzantine, self.n_selected = n_byzantine, n_selected

    def weights(self, gramian: Tensor) -> Tensor:
        count = gramian.shape[0]
        if count < self.n_byzantine + 3 or count < self.n_selected:
            return torch.full((count,), 1.0 / count, dtype=gramian.dtype, device=gramian.device)
        return super().weights(gramian)

    def subset_weights(self, gramian: Tensor, index: Tensor) -> Tensor:
        return self.weights(gramian)


# ---------------------------------------------------------------------------------------------
# Stateful Gramian weightings: the torchjd state loaded from our buffers, read back after


@AGGREGATORS.register("gradvac")
class GradVacAggregator(Aggregator):
    """GradVac (Wang, Tsvetkov, Firat & Cao, ICLR 2021), whole-model granularity.

    torchjd's ``GradVacWeighting`` on the raw Gramian: for each task ``i`` and, in a random order
    (``torch.randperm``, seeded by the owning weighting), each other task ``j``, when the cosine
    ``φ_ij`` of the (already corrected) ``g_i`` and ``g_j`` is below the target ``φ̂_ij``,
    ``g_i += ‖g_i‖(φ̂√(1−φ²) − φ√(1−φ̂²)) / (‖g_j‖√(1−φ̂²) + ε) g_j``; then
    ``φ̂_ij ← (1−β)φ̂_ij + βφ_ij``. The update is the sum of the corrected gradients (sum scale).
    LibMTL's ``GradVac`` computes the same with ``random.shuffle`` orders.

    Args: ``beta`` 0.5 (the EMA decay: LibMTL's ``GradVac_beta``, torchjd's), ``eps`` 1e-8.

    State (buffer ``phi``, ``[T, T]`` float64, initially 0): the targets ``φ̂``. With some tasks
    absent, their rows and columns are left as they are.
    """

    phi: Tensor

    def __init__(self, num_tasks: int, beta: float = 0.5, eps: float = 1e-8) -> None:
        from torchjd.aggregation import GradVacWeighting

        _check(
            "gradvac",
            isinstance(beta, int | float) and 0 <= beta <= 1,
            f"beta must be in [0, 1], got {beta!r}",
        )
        _check(
            "gradvac", isinstance(eps, int | float) and eps >= 0, f"eps must be >= 0, got {eps!r}"
        )
        super().__init__(num_tasks)
        _hold(self, GradVacWeighting(beta=float(beta), eps=float(eps)))
        self.register_buffer("phi", torch.zeros(num_tasks, num_tasks, dtype=torch.float64))

    def weights(self, gramian: Tensor) -> Tensor:
        return self._run(gramian, torch.arange(self.num_tasks))

    def subset_weights(self, gramian: Tensor, index: Tensor) -> Tensor:
        return self._run(gramian, index)

    def _run(self, gramian: Tensor, index: Tensor) -> Tensor:
        inner = self._inner
        rows, cols = index.to(self.phi.device)[:, None], index.to(self.phi.device)[None, :]
        inner._phi_t = self.phi[rows, cols].to("cpu", gramian.dtype).clone()
        inner._state_key = (len(index), gramian.dtype)
        weights = inner(gramian)
        self.phi[rows, cols] = inner._phi_t.to(self.phi)
        inner.reset()
        return weights.to(device=gramian.device, dtype=gramian.dtype)


class _SimplexState(Aggregator):
    """A torchjd weighting whose state is a vector on the simplex (MoDo's λ, SDMGrad's w),
    kept in the buffer ``state`` (``[T]`` float64, initially ``1/T``). With some tasks absent,
    the present entries, renormalised, are the starting point of the present tasks' problem; the
    result takes back their share of the mass (the absent entries are left as they are)."""

    state: Tensor
    attribute = "_lambda"

    def __init__(self, num_tasks: int, inner: Any, scale: str) -> None:
        super().__init__(num_tasks, scale)
        _hold(self, inner)
        self.register_buffer(
            "state", torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
        )

    def weights(self, gramian: Tensor) -> Tensor:
        return self._run(gramian, torch.arange(self.num_tasks))

    def subset_weights(self, gramian: Tensor, index: Tensor) -> Tensor:
        return self._run(gramian, index)

    def _run(self, gramian: Tensor, index: Tensor) -> Tensor:
        inner = self._inner
        index = index.to(self.state.device)
        start = self.state[index]
        mass = start.sum()
        full = len(index) == self.num_tasks
        if not full:
            start = start / mass if bool(mass > 0) else torch.full_like(start, 1.0 / len(index))
        setattr(inner, self.attribute, start.to(gramian.device, gramian.dtype).clone())
        inner._state_key = (len(index), gramian.dtype, gramian.device)
        weights = inner(self._input(gramian))
        found = getattr(inner, self.attribute).to(self.state)
        self.state[index] = found if full or not bool(mass > 0) else found * mass
        if not full:
            self.state.div_(self.state.sum())
        inner.reset()
        return weights.to(device=gramian.device, dtype=gramian.dtype)

    def _input(self, gramian: Tensor) -> Tensor:
        return gramian


@AGGREGATORS.register("modo")
class MoDoAggregator(_SimplexState):
    """MoDo (Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning",
    NeurIPS 2023 / JMLR 2024): one projected gradient step on the task weights per call,
    ``λ ← Π_Δ(λ − γ(G λ + ρ λ))``, then ``d = λᵀJ`` (torchjd's ``MoDoWeighting``, mean scale;
    ``scale="sum"``: × T). ``G`` is the raw Gramian ``J Jᵀ`` of the step's (process-averaged,
    window-summed) gradients: the paper and LibMTL use ``J₁ J₂ᵀ`` of two further independent
    batches and ``J₃`` for the direction (3 batches per step); see docs/weighting.md.

    Args: ``gamma`` 1e-3 (LibMTL's ``MoDo_gamma``; torchjd's default is 0.1), ``rho`` 0.1
    (LibMTL's, torchjd's). State: ``λ`` (buffer ``state``)."""

    def __init__(
        self, num_tasks: int, gamma: float = 1e-3, rho: float = 0.1, scale: str = "mean"
    ) -> None:
        from torchjd.aggregation import MoDoWeighting

        _check(
            "modo",
            isinstance(gamma, int | float) and gamma > 0,
            f"gamma must be > 0, got {gamma!r}",
        )
        _check("modo", isinstance(rho, int | float) and rho >= 0, f"rho must be >= 0, got {rho!r}")
        super().__init__(num_tasks, MoDoWeighting(gamma=float(gamma), rho=float(rho)), scale)


@AGGREGATORS.register("sdmgrad")
class SDMGradAggregator(_SimplexState):
    """SDMGrad (Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning", NeurIPS 2023):
    ``n_iter`` steps of SGD with momentum on ``w`` (projected on the simplex, from the previous
    call's ``w``) for ``min ½‖wᵀJ‖² + λ wᵀJ ḡ`` on the Gramian divided by the squared mean
    gradient norm, then ``d = (w + λ/T)ᵀJ / (1 + λ)`` (torchjd's ``SDMGradWeighting``; mean
    scale, ``scale="sum"``: × T). One Gramian ``J Jᵀ`` (the paper's ``J_ξ J_ξ'ᵀ`` uses two
    independent batches; the official code's three gradient buffers are one shared tensor, so it
    too uses one batch for all three); see docs/weighting.md.

    Args: ``lamda`` 0.3 (the official runs' ``--lamda`` and LibMTL's ``SDMGrad_lamda``), ``niter``
    20 (both), ``lr`` 10 (the official code; LibMTL uses 5), ``momentum`` 0.5 (both). State:
    ``w`` (buffer ``state``)."""

    attribute = "_w"

    def __init__(
        self,
        num_tasks: int,
        lamda: float = 0.3,
        niter: int = 20,
        lr: float = 10.0,
        momentum: float = 0.5,
        scale: str = "mean",
    ) -> None:
        from torchjd.aggregation import SDMGradWeighting

        _check(
            "sdmgrad",
            isinstance(lamda, int | float) and lamda >= 0,
            f"lamda must be >= 0, got {lamda!r}",
        )
        _check(
            "sdmgrad",
            isinstance(niter, int) and niter >= 1,
            f"niter must be an integer >= 1, got {niter!r}",
        )
        _check("sdmgrad", isinstance(lr, int | float) and lr > 0, f"lr must be > 0, got {lr!r}")
        _check("sdmgrad", isinstance(momentum, int | float) and 0 <= momentum < 1,
               f"momentum must be in [0, 1), got {momentum!r}")  # fmt: skip
        inner = SDMGradWeighting(lr=float(lr), momentum=float(momentum), n_iter=niter,
                                 lambda_=float(lamda))  # fmt: skip
        super().__init__(num_tasks, inner, scale)


@AGGREGATORS.register("pcd")
class PCDAggregator(Aggregator):
    """PCD (Varam et al., "Priority-Constrained Descent", TMLR 2026): follow the ``primary``
    task's gradient as closely as possible while every other task gets at least the fraction
    ``tau`` of the first-order progress of its own normalised gradient (gradients normalised by a
    bias-corrected EMA of their squared norms), rescaled to the primary gradient's norm
    (torchjd's ``PCDWeighting``; its own scale). Absent primary task: the sum of the present
    gradients (nothing to follow), the state untouched; other absent tasks: their averages are
    not updated (the step count is shared).

    Args: ``primary`` (a task index, 0: the run's first task), ``tau`` 0.02, ``beta`` 0.999,
    ``eps`` 1e-8 (torchjd's defaults). State (buffers): ``sq_norm_ema`` (``[T]`` float64),
    ``steps``."""

    sq_norm_ema: Tensor
    steps: Tensor

    def __init__(
        self, num_tasks: int, primary: int = 0, tau: float = 0.02, beta: float = 0.999,
        eps: float = 1e-8,
    ) -> None:  # fmt: skip
        from torchjd.aggregation import PCDWeighting

        _check("pcd", isinstance(primary, int) and 0 <= primary < num_tasks,
               f"primary must be a task index in [0, {num_tasks}), got {primary!r}")  # fmt: skip
        try:
            inner = PCDWeighting(tau=float(tau), beta=float(beta), eps=float(eps))
        except (TypeError, ValueError) as err:
            raise ValueError(f"pcd: {err}") from None
        super().__init__(num_tasks)
        self.primary = primary
        _hold(self, inner)
        self.register_buffer("sq_norm_ema", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def weights(self, gramian: Tensor) -> Tensor:
        return self._run(gramian, torch.arange(self.num_tasks))

    def subset_weights(self, gramian: Tensor, index: Tensor) -> Tensor:
        return self._run(gramian, index)

    def _run(self, gramian: Tensor, index: Tensor) -> Tensor:
        index = index.to(self.sq_norm_ema.device)
        where = (index == self.primary).nonzero().flatten().tolist()
        if not where:
            return torch.ones(len(index), dtype=gramian.dtype, device=gramian.device)
        order = torch.tensor([where[0]] + [i for i in range(len(index)) if i != where[0]])
        inner = self._inner
        inner._sq_norm_ema = self.sq_norm_ema[index[order]].cpu().clone()
        inner._n_steps = self.steps.cpu().clone()
        inner._state_key = len(index)
        permuted = inner(gramian[order][:, order])
        if bool(torch.isfinite(permuted).all()):  # torchjd leaves its state as it was otherwise
            self.sq_norm_ema[index[order]] = inner._sq_norm_ema.to(self.sq_norm_ema)
            self.steps.copy_(inner._n_steps)
        inner.reset()
        weights = torch.empty_like(permuted)
        weights[order.to(permuted.device)] = permuted
        return weights.to(device=gramian.device, dtype=gramian.dtype)


@AGGREGATORS.register("cr_mogm")
class CRMOGMAggregator(Aggregator):
    """CR-MOGM (Zhou et al., "On the Convergence of Stochastic Multi-Objective Gradient
    Manipulation and Beyond", NeurIPS 2022): the weights of a Gramian method ``base`` smoothed
    across steps, ``λ_k = α λ_{k−1} + (1 − α) λ̂_k`` with ``λ_0 = λ̂_1`` (torchjd's
    ``CRMOGMWeighting``). The smoothing acts on the base's ``[T]`` weights after its handling
    of absent tasks (an absent task's weight decays; its gradient row is zero).

    Args: ``base`` ``"mgda"`` (the paper's main case) and ``base_kwargs`` (any Gramian
    aggregator and its arguments; its state is checkpointed with this one), ``alpha`` 0.9
    (torchjd's default; the paper's schedule raises it as the learning rate decays).
    State (buffers): ``lam`` (``[T]`` float64), ``started``; and the base's."""

    lam: Tensor
    started: Tensor

    def __init__(
        self,
        num_tasks: int,
        base: str = "mgda",
        alpha: float = 0.9,
        base_kwargs: dict[str, Any] | None = None,
    ) -> None:
        from torchjd.aggregation import CRMOGMWeighting

        _check(
            "cr_mogm",
            isinstance(alpha, int | float) and 0 <= alpha <= 1,
            f"alpha must be in [0, 1], got {alpha!r}",
        )
        _check("cr_mogm", base != "cr_mogm", "base cannot be cr_mogm itself")
        super().__init__(num_tasks)
        self.base = build_aggregator(base, num_tasks, **(base_kwargs or {}))
        _check("cr_mogm", isinstance(self.base, Aggregator),
               f"base must be a Gramian aggregator, {base!r} works on the Jacobian")  # fmt: skip
        _hold(self, CRMOGMWeighting(nn.Identity(), alpha=float(alpha)))
        self.register_buffer("lam", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def weights(self, gramian: Tensor) -> Tensor:
        return self.forward(gramian)

    def forward(self, gramian: Tensor, present: Tensor | None = None) -> Tensor:
        estimate = self.base(gramian, present)
        inner = self._inner
        inner._lambda = self.lam.to(estimate).clone() if bool(self.started) else None
        smoothed = inner(estimate)
        self.lam.copy_(smoothed.detach().to(self.lam))
        self.started.fill_(True)
        inner._lambda = None
        return smoothed


# ---------------------------------------------------------------------------------------------
# Methods on the Jacobian


@AGGREGATORS.register("graddrop")
class GradDropAggregator(JacobianAggregator):
    """GradDrop (Chen et al., "Just Pick a Sign", NeurIPS 2020, Alg. 1 lines 10–15; torchjd's
    ``GradDrop``): per coordinate, the positive-sign purity ``P = ½(1 + Σ g / Σ|g|)``, one
    uniform draw ``U`` (seeded by the owning weighting), and each task keeps its coordinate when
    its sign is the one picked (``+`` when ``P > U``), times ``1 − leak`` (``leak`` of it always
    passes); the update is the sum (sum scale). On the shared parameters' gradients (torchjd's
    use): the paper and LibMTL apply it to the gradients of the shared representation (batch
    summed, signed by the activations); see docs/weighting.md.

    Args: ``leak`` 0.0 (LibMTL's ``leak``; torchjd's no-leak default)."""

    def __init__(self, num_tasks: int, leak: float = 0.0) -> None:
        from torchjd.aggregation import GradDrop

        _check(
            "graddrop",
            isinstance(leak, int | float) and 0 <= leak <= 1,
            f"leak must be in [0, 1], got {leak!r}",
        )
        super().__init__(num_tasks)
        self.leak = float(leak)
        _hold(self, GradDrop())

    def combine(self, jacobian: Tensor) -> Tensor:
        inner = self._inner
        inner.leak = torch.full((jacobian.shape[0],), self.leak, dtype=jacobian.dtype,
                                device=jacobian.device)  # fmt: skip
        return inner(jacobian)


@AGGREGATORS.register("trimmed_mean")
class TrimmedMeanAggregator(JacobianAggregator):
    """Coordinate-wise trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning", ICML
    2018; torchjd's ``TrimmedMean``): per coordinate, the ``trim_number`` largest and smallest
    task values dropped, the rest averaged (mean scale; ``scale="sum"``: × the tasks present).
    With ``k`` tasks present, at most ``(k − 1) // 2`` are trimmed each side (1 task: itself).

    Args: ``trim_number`` 1 (3 tasks: the coordinate-wise median)."""

    def __init__(self, num_tasks: int, trim_number: int = 1, scale: str = "mean") -> None:
        from torchjd.aggregation import TrimmedMean

        _check("trimmed_mean", isinstance(trim_number, int) and trim_number >= 0,
               f"trim_number must be an integer >= 0, got {trim_number!r}")  # fmt: skip
        _check(
            "trimmed_mean",
            scale in ("mean", "sum"),
            f"scale must be 'mean' or 'sum', got {scale!r}",
        )
        super().__init__(num_tasks)
        self.trim_number, self.scale = trim_number, scale
        _hold(self, TrimmedMean(trim_number))

    def combine(self, jacobian: Tensor) -> Tensor:
        count = jacobian.shape[0]
        inner = self._inner
        inner.trim_number = min(self.trim_number, (count - 1) // 2)
        direction = inner(jacobian)
        return direction * count if self.scale == "sum" else direction


@AGGREGATORS.register("config")
class ConFIGAggregator(JacobianAggregator):
    """ConFIG (Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed
    Neural Networks", ICLR 2025, Eq. 2; torchjd's ``ConFIG``): the direction with equal positive
    cosine to every task gradient (``pinv`` of the unit gradients times ones, normalised), of
    length ``Σ_t g_tᵀu`` (sum scale, the official code's). ``pinv`` of a ``[T, n]`` matrix: an
    SVD of the Jacobian each step."""

    def __init__(self, num_tasks: int) -> None:
        from torchjd.aggregation import ConFIG

        super().__init__(num_tasks)
        _hold(self, ConFIG())

    def combine(self, jacobian: Tensor) -> Tensor:
        return self._inner(jacobian)


@AGGREGATORS.register("excess_mtl")
class ExcessMTLAggregator(JacobianAggregator):
    """ExcessMTL (He, Zhou, Zhao & Wang, "Robust Multi-Task Learning with Excess Risks", ICML
    2024; torchjd's ``ExcessMTLWeighting``): AdaGrad-style sums ``S += g²`` per task and
    coordinate, excess risks ``e_t = Σ g_t² / √(S_t + 1e-7)`` divided by a baseline, and an
    exponentiated-gradient step ``w ← softmax(log w + η e)``; ``d = wᵀJ``.

    As the official code and LibMTL: the weights start uniform and the first call only records
    the baseline (torchjd also steps on that call, with the raw excess risks: that step is undone
    here) when ``warmup_steps`` is 0; the weights sum to ``T`` (``scale="sum"``, the reference's;
    ``"mean"``: torchjd's 1). ``warmup_steps > 0``: torchjd's warm-up (uniform weights, the
    baseline the warm-up's mean). Absent tasks: the present tasks' problem on their state (their
    weights renormalised, then given back their share); the baseline of a task first seen later
    is set then (for all present tasks when one of them has none).

    Args: ``robust_step_size`` 1e-2 (η: LibMTL's and the official code's default; torchjd's is
    1), ``warmup_steps`` 0, ``scale`` sum.

    State (buffers): ``w`` (``[T]`` float64, on the simplex), ``baseline`` and ``warmup_sum``
    (``[T]``), ``known`` (``[T]`` bool: which baselines exist), ``steps``, and ``sq_grad_sum``
    (``[T, n]``, ``n`` the shared parameters: sized by :meth:`size_state`, which the trainable
    module calls at construction so that a checkpoint loads into it; otherwise at the first
    call). ``last_weights`` (``[T]``, not state) are the latest weights, for the logs.
    """

    w: Tensor
    baseline: Tensor
    warmup_sum: Tensor
    known: Tensor
    steps: Tensor
    sq_grad_sum: Tensor

    def __init__(
        self,
        num_tasks: int,
        robust_step_size: float = 1e-2,
        warmup_steps: int = 0,
        scale: str = "sum",
    ) -> None:
        from torchjd.aggregation import ExcessMTLWeighting

        _check("excess_mtl", isinstance(robust_step_size, int | float) and robust_step_size > 0,
               f"robust_step_size must be > 0, got {robust_step_size!r}")  # fmt: skip
        _check("excess_mtl", isinstance(warmup_steps, int) and warmup_steps >= 0,
               f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")  # fmt: skip
        _check(
            "excess_mtl", scale in ("mean", "sum"), f"scale must be 'mean' or 'sum', got {scale!r}"
        )
        super().__init__(num_tasks)
        self.scale, self.warmup_steps = scale, warmup_steps
        _hold(self, ExcessMTLWeighting(float(robust_step_size), warmup_steps))
        t = num_tasks
        self.register_buffer("w", torch.full((t,), 1.0 / t, dtype=torch.float64))
        self.register_buffer("baseline", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("warmup_sum", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("known", torch.zeros(t, dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("sq_grad_sum", torch.zeros(t, 0))
        self.last_weights: Tensor | None = None

    def size_state(self, numel: int, dtype: torch.dtype = torch.float32) -> None:
        """Give ``sq_grad_sum`` its shape ``[T, numel]`` (zeros) unless it has it."""
        if self.sq_grad_sum.shape[1] != numel:
            self.sq_grad_sum = torch.zeros(self.num_tasks, numel, dtype=dtype,
                                           device=self.sq_grad_sum.device)  # fmt: skip

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        saved = state_dict.get(prefix + "sq_grad_sum")
        if saved is not None:
            self.size_state(saved.shape[1], saved.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def combine(self, jacobian: Tensor) -> Tensor:
        return self.forward(jacobian)

    def forward(self, jacobian: Tensor, present: Tensor | None = None) -> Tensor:
        if jacobian.shape[0] != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} gradient rows, got {jacobian.shape[0]}")
        self.size_state(jacobian.shape[1], jacobian.dtype)
        if present is None:
            present = torch.ones(self.num_tasks, dtype=torch.bool, device=jacobian.device)
        index = present.nonzero().flatten().to(self.w.device)
        weights = torch.zeros(self.num_tasks, dtype=jacobian.dtype, device=jacobian.device)
        if len(index):
            weights[index.to(jacobian.device)] = self._step(
                jacobian[index.to(jacobian.device)], index
            )
        if self.scale == "sum":
            weights = weights * len(index)
        self.last_weights = weights.detach()
        return weights @ jacobian

    def _step(self, rows: Tensor, index: Tensor) -> Tensor:
        """torchjd's update of the present tasks' state; their weights on their simplex."""
        inner, dtype = self._inner, rows.dtype
        full = len(index) == self.num_tasks
        start = self.w[index]
        mass = start.sum()
        all_known = bool(self.known[index].all())
        inner._weights = (start / mass).to(rows.device, dtype).clone()
        inner._sq_grad_sum = self.sq_grad_sum[index].to(rows.device, dtype).clone()
        inner._initial_w = self.baseline[index].to(rows.device, dtype) if all_known else None
        inner._warmup_w_sum = self.warmup_sum[index].to(rows.device, dtype).clone()
        inner._n_steps = int(self.steps)
        inner._state_key = (len(index), rows.shape[1], dtype, rows.device)
        found = inner(rows)
        if not all_known and inner._initial_w is not None:
            self.baseline[index] = inner._initial_w.to(self.baseline)
            self.known[index] = True
            if self.warmup_steps == 0:  # the reference's first call records the baseline only
                found = inner._weights = (start / mass).to(rows.device, dtype)
        self.sq_grad_sum[index] = inner._sq_grad_sum.to(self.sq_grad_sum)
        self.warmup_sum[index] = inner._warmup_w_sum.to(self.warmup_sum)
        if full:
            self.steps.fill_(inner._n_steps)
        else:
            self.steps.fill_(max(int(self.steps), inner._n_steps))
        self.w[index] = found.to(self.w) * mass
        self.w.div_(self.w.sum())
        inner.reset()
        return found.to(dtype)
