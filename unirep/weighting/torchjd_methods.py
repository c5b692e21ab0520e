"""Registry entries of the gradient methods whose combination rule is torchjd's (issue 26).

Each entry is a :class:`~unirep.weighting.gradient.GradientWeighting` (per-task gradients of the
shared parameters, averaged over processes, combined once per optimizer step) with an aggregator
of :mod:`unirep.weighting.torchjd_aggregators`: ``gradvac``, ``graddrop``, ``fairgrad``,
``modo``, ``sdmgrad``, ``dualproj``, ``excess_mtl``, ``krum``, ``trimmed_mean``, ``config``,
``pcd``, ``cr_mogm``. ``seed`` seeds the random choices (GradVac's task orders, GradDrop's
draws) with ``seed + calls``, the same on every process and after a resume.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from unirep.weighting.aggregators import build_aggregator
from unirep.weighting.base import WEIGHTINGS, Weighting
from unirep.weighting.gradient import GradientWeighting
from unirep.weighting.torchjd_aggregators import ExcessMTLAggregator


def _gradient(
    tasks: list[str], name: str, seed: int, path: str = "auto", **kwargs: Any
) -> Weighting:
    """A :class:`GradientWeighting` around the aggregator ``name``; ``path`` (``auto``,
    ``jacobian``, ``gramian``) only for the Gramian-only methods (the others take the Jacobian
    path whatever it says)."""
    return GradientWeighting(tasks, build_aggregator(name, len(tasks), **kwargs), seed, path=path)


@WEIGHTINGS.register("gradvac")
def gradvac(tasks: list[str], beta: float = 0.5, eps: float = 1e-8, seed: int = 0) -> Weighting:
    """GradVac (Wang et al., ICLR 2021): gradients pushed towards EMA cosine targets, summed."""
    return _gradient(tasks, "gradvac", seed, beta=beta, eps=eps)


@WEIGHTINGS.register("graddrop")
def graddrop(tasks: list[str], leak: float = 0.0, seed: int = 0) -> Weighting:
    """GradDrop (Chen et al., NeurIPS 2020): per-coordinate sign dropout, on the shared
    parameters' gradients."""
    return _gradient(tasks, "graddrop", seed, leak=leak)


@WEIGHTINGS.register("fairgrad")
def fairgrad(
    tasks: list[str],
    alpha: float = 1.0,
    max_iters: int | None = None,
    path: str = "auto",
    seed: int = 0,
) -> Weighting:
    """FairGrad (Ban & Ji, ICML 2024): α-fair resource allocation, ``G w = w^{-1/α}``."""
    return _gradient(tasks, "fairgrad", seed, path=path, alpha=alpha, max_iters=max_iters)


@WEIGHTINGS.register("modo")
def modo(
    tasks: list[str],
    gamma: float = 1e-3,
    rho: float = 0.1,
    scale: str = "mean",
    path: str = "auto",
    seed: int = 0,
) -> Weighting:
    """MoDo (Chen et al., NeurIPS 2023 / JMLR 2024): one projected step on the task weights per
    optimizer step."""
    return _gradient(tasks, "modo", seed, path=path, gamma=gamma, rho=rho, scale=scale)


@WEIGHTINGS.register("sdmgrad")
def sdmgrad(
    tasks: list[str],
    lamda: float = 0.3,
    niter: int = 20,
    lr: float = 10.0,
    momentum: float = 0.5,
    scale: str = "mean",
    path: str = "auto",
    seed: int = 0,
) -> Weighting:
    """SDMGrad (Xiao et al., NeurIPS 2023): MGDA pulled towards the mean gradient by ``lamda``."""
    return _gradient(
        tasks,
        "sdmgrad",
        seed,
        path=path,
        lamda=lamda,
        niter=niter,
        lr=lr,
        momentum=momentum,
        scale=scale,
    )


@WEIGHTINGS.register("dualproj")
def dualproj(tasks: list[str], scale: str = "mean", path: str = "auto", seed: int = 0) -> Weighting:
    """DualProj (torchjd): the mean gradient projected onto the dual cone of the gradients."""
    return _gradient(tasks, "dualproj", seed, path=path, scale=scale)


@WEIGHTINGS.register("krum")
def krum(
    tasks: list[str], n_byzantine: int = 0, n_selected: int = 1, scale: str = "mean",
    path: str = "auto",
    seed: int = 0,
) -> Weighting:  # fmt: skip
    """(Multi-)Krum (Blanchard et al., NeurIPS 2017) on the task gradients (needs at least
    ``n_byzantine + 3`` tasks)."""
    if len(tasks) < n_byzantine + 3 or len(tasks) < n_selected:
        raise ValueError(
            f"krum needs at least n_byzantine + 3 = {n_byzantine + 3} and n_selected = "
            f"{n_selected} tasks, got {len(tasks)}"
        )
    return _gradient(
        tasks, "krum", seed, path=path, n_byzantine=n_byzantine, n_selected=n_selected, scale=scale
    )


@WEIGHTINGS.register("trimmed_mean")
def trimmed_mean(
    tasks: list[str], trim_number: int = 1, scale: str = "mean", seed: int = 0
) -> Weighting:
    """Coordinate-wise trimmed mean of the task gradients (Yin et al., ICML 2018)."""
    return _gradient(tasks, "trimmed_mean", seed, trim_number=trim_number, scale=scale)


@WEIGHTINGS.register("config")
def config(tasks: list[str], seed: int = 0) -> Weighting:
    """ConFIG (Liu et al., ICLR 2025): the conflict-free direction, equal cosine to every task."""
    return _gradient(tasks, "config", seed)


@WEIGHTINGS.register("pcd")
def pcd(
    tasks: list[str],
    primary: str | None = None,
    tau: float = 0.02,
    beta: float = 0.999,
    eps: float = 1e-8,
    path: str = "auto",
    seed: int = 0,
) -> Weighting:
    """PCD (TMLR 2026): follow the ``primary`` task (default: the first), every other task
    guaranteed the fraction ``tau`` of its own progress."""
    if primary is not None and primary not in tasks:
        raise ValueError(f"pcd primary must be one of the tasks {tasks}, got {primary!r}")
    index = 0 if primary is None else tasks.index(primary)
    return _gradient(tasks, "pcd", seed, path=path, primary=index, tau=tau, beta=beta, eps=eps)


@WEIGHTINGS.register("cr_mogm")
def cr_mogm(
    tasks: list[str],
    base: str = "mgda",
    alpha: float = 0.9,
    base_kwargs: dict[str, Any] | None = None,
    path: str = "auto",
    seed: int = 0,
) -> Weighting:
    """CR-MOGM (Zhou et al., NeurIPS 2022): a Gramian method's weights smoothed by an EMA."""
    return _gradient(
        tasks, "cr_mogm", seed, path=path, base=base, alpha=alpha, base_kwargs=base_kwargs
    )


class ExcessMTLWeighting(GradientWeighting):
    """``excess_mtl``: a :class:`GradientWeighting` whose aggregator keeps a ``[T, n]`` state
    shaped like the shared parameters; :meth:`bind_shared` sizes it when the trainable module
    is built, so that a checkpoint's state loads into it. ``weight/<t>`` logs its weights."""

    aggregator: ExcessMTLAggregator

    def bind_shared(self, shared: list[nn.Parameter]) -> None:
        """Size the state for the shared parameters the run will hand to :meth:`backward`."""
        self.aggregator.size_state(sum(p.numel() for p in shared if p.requires_grad))


@WEIGHTINGS.register("excess_mtl")
def excess_mtl(
    tasks: list[str],
    robust_step_size: float = 1e-2,
    warmup_steps: int = 0,
    scale: str = "sum",
    seed: int = 0,
) -> Weighting:
    """ExcessMTL (He et al., ICML 2024): exponentiated-gradient weights from excess-risk
    estimates."""
    aggregator = build_aggregator(
        "excess_mtl", len(tasks), robust_step_size=robust_step_size, warmup_steps=warmup_steps,
        scale=scale,
    )  # fmt: skip
    return ExcessMTLWeighting(tasks, aggregator, seed)
