"""Non-linear loss scalarizations, torchjd's (``torchjd.scalarization``): ``gls`` and ``stch``.

One backward, like every :class:`~unirep.weighting.base.LossWeighting`. The scalarization ``s``
is not linear in the losses, so its gradient over processes is not the process mean of each
process's ``∇ s(L_p)``. To make a 2-process run compute what a 1-process run computes on the
global batch, ``s`` is linearised at the **process-averaged** losses ``L̄`` (per task, over the
processes that have it; :func:`~unirep.weighting.loss_stats.global_mean`): the scalar
back-propagated is ``s(L̄) + Σ_t c_t/f_t (L_t − sg(L_t))`` with ``c = ∇s(L̄)`` (torchjd's
scalarizer differentiated by autograd on a detached copy of ``L̄``) and ``f_t`` the fraction of
processes with task ``t``: its value is ``s(L̄)`` and DDP's gradient average gives ``∇_θ s(L̄)``
exactly. With one process ``L̄ = L`` and the gradient is autograd's on ``s(L)``. Joint terms are
added with weight 1. ``weight/<t>`` logs ``c_t``, the effective weight of ``L_t``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from unirep.losses.bundle import LossBundle
from unirep.weighting.base import WEIGHTINGS, LossWeighting
from unirep.weighting.loss_stats import (
    add_terms,
    checked_task_losses,
    finite_float,
    global_mean,
    loss_vector,
)

TINY = 1e-20  # LibMTL's / the STCH code's guard inside the logarithm


class _Scalarization(LossWeighting):
    """The linearised scalarization of the present tasks' losses (see the module)."""

    coefficients: Tensor

    def __init__(self, tasks: list[str]) -> None:
        super().__init__(tasks)
        self.register_buffer("coefficients", torch.zeros(len(self.tasks)))

    @abc.abstractmethod
    def scalarize(self, losses: Tensor, index: Tensor) -> Tensor:
        """``s`` of the process-averaged losses ``[k]`` of the tasks ``index`` (``[k]``)."""

    def observe(self, mean: Tensor, known: Tensor) -> None:
        """The micro-batch's process-averaged ``[T]`` losses (``known``: present somewhere)."""

    def combine(self, bundle: LossBundle, accelerator: Any = None) -> Tensor:
        losses = checked_task_losses(bundle, self.tasks)
        joint = bundle.joint_loss()
        values, present = loss_vector(losses, self.tasks, self.coefficients)
        mean, count, _ = global_mean(values, present, accelerator)
        known = count > 0
        self.observe(mean, known)
        index = known.nonzero().flatten()
        if not len(index):
            self.coefficients.zero_()
            return add_terms([], joint)
        point = mean[index].detach().double().requires_grad_(True)
        with torch.enable_grad():
            value = self.scalarize(point, index)
            (grad,) = torch.autograd.grad(value, point)
        coefficients = torch.zeros(len(self.tasks), dtype=torch.float64, device=grad.device)
        coefficients[index] = grad
        self.coefficients.copy_(coefficients)
        order = {t: i for i, t in enumerate(self.tasks)}
        local = [(losses[t], order[t]) for t in self.tasks if t in losses]
        like = local[0][0] if local else None
        terms = [
            (coefficients[i] / count[i].double()).to(loss) * (loss - loss.detach())
            for loss, i in local
        ]
        base = value.detach().to(like if like is not None else self.coefficients)
        return add_terms([base, *terms], joint)

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.coefficients.tolist(), strict=True))


@WEIGHTINGS.register("gls")
class GLSWeighting(_Scalarization):
    """GLS, the geometric loss strategy (Chennupati et al., "MultiNet++", CVPR Workshops 2019;
    LibMTL ``GLS``): ``s(L) = (Π_t L_t)^{1/T}`` over the present tasks (torchjd's
    ``GeometricMean``, ``exp(mean log L)``). The effective weight of ``L_t`` is
    ``s/(T·L_t)``. The losses must be positive (torchjd refuses negative ones; a zero loss gives
    ``s = 0`` and no finite weights). No state beyond the logged weights; no arguments.

    Shapes: every loss term is a scalar; the result is a scalar.
    """

    def __init__(self, tasks: list[str]) -> None:
        super().__init__(tasks)
        from torchjd.scalarization import GeometricMean

        self._inner: Callable[[Tensor], Tensor] = GeometricMean()

    def scalarize(self, losses: Tensor, index: Tensor) -> Tensor:
        return self._inner(losses)


@WEIGHTINGS.register("stch")
class STCHWeighting(_Scalarization):
    """STCH, smooth Tchebycheff scalarization (Lin et al., ICML 2024; its ``STCH_MTL`` code,
    LibMTL ``STCH``).

    Three phases, counted in optimizer steps (:meth:`after_step`):

    1. ``steps < warmup_steps``: ``s = Σ_t log(L_t + 1e-20)`` (the reference's warm-up);
    2. the next ``nadir_steps`` steps: the same, and the process-averaged losses of every
       micro-batch are averaged into the normalisation point ``z`` (per task; the reference's
       ``nadir_vector``, the mean loss of its warm-up's last epoch);
    3. then ``s = T·μ·log Σ_t exp(log(L_t/z_t + 1e-20)/μ)`` (torchjd's ``STCH`` with unit
       preferences on the log-normalised losses, times ``T``, the number of the run's tasks, as
       the reference). A task never seen in phase 2 gets ``z_t = 1``.

    The reference counts phases in epochs (``STCH_warmup_epoch`` 4, then one epoch of
    averaging); runs here are streams, so the defaults are ``warmup_steps`` 200 and
    ``nadir_steps`` 50 (four and one of dwa's 50-step periods). ``mu`` 1.0 (LibMTL's
    ``STCH_mu``). ``warmup_steps = nadir_steps = 0``: STCH from the start with ``z = 1``.

    State (buffers, checkpointed): ``steps``, ``nadir_sum``, ``nadir_count`` (``[T]``),
    ``nadir`` (``[T]``, ones until phase 3) and the logged ``coefficients``.

    Shapes: every loss term is a scalar; the result is a scalar.
    """

    steps: Tensor
    nadir_sum: Tensor
    nadir_count: Tensor
    nadir: Tensor

    def __init__(
        self, tasks: list[str], mu: float = 1.0, warmup_steps: int = 200, nadir_steps: int = 50
    ) -> None:
        super().__init__(tasks)
        from torchjd.scalarization import STCH

        self.mu = finite_float("mu", mu, low=0.0, strict=True)
        for key, value in (("warmup_steps", warmup_steps), ("nadir_steps", nadir_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
        self.warmup_steps, self.nadir_steps = warmup_steps, nadir_steps
        self._stch = STCH
        count = len(self.tasks)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("nadir_sum", torch.zeros(count, dtype=torch.float64))
        self.register_buffer("nadir_count", torch.zeros(count, dtype=torch.float64))
        self.register_buffer("nadir", torch.ones(count, dtype=torch.float64))

    @property
    def phase(self) -> int:
        """1 (warm-up), 2 (averaging the normalisation point) or 3 (STCH)."""
        steps = int(self.steps)
        if steps < self.warmup_steps:
            return 1
        return 2 if steps < self.warmup_steps + self.nadir_steps else 3

    def observe(self, mean: Tensor, known: Tensor) -> None:
        if self.phase == 2:
            self.nadir_sum += torch.where(known, mean, torch.zeros_like(mean)).to(self.nadir_sum)
            self.nadir_count += known.to(self.nadir_count)

    def scalarize(self, losses: Tensor, index: Tensor) -> Tensor:
        if self.phase < 3:
            return torch.log(losses + TINY).sum()
        nadir = self.nadir[index].to(losses)
        prefs = torch.ones_like(losses)
        return len(self.tasks) * self._stch(self.mu, weights=prefs)(
            torch.log(losses / nadir + TINY)
        )

    def after_step(self, task_losses: dict[str, Tensor], accelerator: Any) -> None:
        self.steps += 1
        if int(self.steps) == self.warmup_steps + self.nadir_steps and self.nadir_steps > 0:
            seen = self.nadir_count > 0
            safe = torch.where(seen, self.nadir_count, torch.ones_like(self.nadir_count))
            self.nadir.copy_(torch.where(seen, self.nadir_sum / safe, torch.ones_like(safe)))
