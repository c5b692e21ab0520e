"""Gradient methods that keep state shaped like the shared parameters (MoCo's tracked gradients,
DB-MTL's gradient EMA) and read the task losses as well as their gradients.

:class:`TrackedGradientWeighting` is a :class:`~unirep.weighting.gradient.GradientWeighting`
that, on every micro-batch, averages the task losses over processes (one all-reduce of ``[2, T]``)
before anything else, so that every process sees the global batch's losses:

- :meth:`TrackedGradientWeighting.observe_losses` gets each micro-batch's process-averaged
  losses (DB-MTL rescales the losses by them before their gradients are taken);
- at the window's last micro-batch the aggregator gets the window's losses (:attr:`losses`,
  averaged over the micro-batches and processes that had each task) with the process-averaged
  Jacobian, so its state is updated from averaged inputs only and is the same on every process.

:class:`TrackedAggregator` holds a ``[T, n]`` state (``n`` = the number of shared scalars) in a
buffer, sized by :meth:`~unirep.weighting.base.Weighting.bind_shared` when the trainable module
is built (so that a checkpoint's state fits a fresh run before anything is loaded), or on the
first window when the weighting is used on its own. Cost: the buffer is ``T`` copies of the
shared parameters (like Adam's moments), and DDP broadcasts it with the other buffers at each
forward (every process already holds the same values).
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor, nn

from unirep.losses.bundle import LossBundle
from unirep.weighting.aggregators import JacobianAggregator
from unirep.weighting.base import process_mean
from unirep.weighting.gradient import GradientWeighting
from unirep.weighting.loss_stats import checked_task_losses, loss_vector


class TrackedAggregator(JacobianAggregator):
    """A Jacobian aggregator with a ``[T, n]`` buffer :attr:`tracked` (empty until sized) that
    also reads the window's task losses.

    Subclasses implement :meth:`step` on the present tasks' rows; :meth:`weight_logs` gives the
    effective weights for the log.
    """

    tracked: Tensor

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.register_buffer("tracked", torch.zeros(num_tasks, 0))
        self.losses: Tensor | None = None  # the window's [T] losses, set by the weighting

    def allocate(self, size: int, dtype: torch.dtype, device: torch.device | None = None) -> None:
        """Size :attr:`tracked` to ``[T, size]`` zeros (once; a different size later is an
        error: the shared parameters changed)."""
        if self.tracked.shape[1] == size and self.tracked.dtype == dtype:
            return
        if self.tracked.numel():
            raise ValueError(
                f"the shared parameters changed size ({self.tracked.shape[1]} → {size} scalars) "
                "while the weighting tracks their gradients"
            )
        device = self.tracked.device if device is None else device
        self.tracked = torch.zeros(self.num_tasks, size, dtype=dtype, device=device)

    @abc.abstractmethod
    def step(self, jacobian: Tensor, index: Tensor, losses: Tensor) -> Tensor:
        """Update the state of the present tasks ``index`` (``[k]``, ascending) from their rows
        ``jacobian`` (``[k, n]``) and window losses ``losses`` (``[k]``); the direction ``[n]``."""

    @abc.abstractmethod
    def weight_logs(self) -> Tensor:
        """The current effective task weights ``[T]`` (logged as ``weight/<t>``)."""

    def combine(self, jacobian: Tensor) -> Tensor:
        """Every task present: :meth:`forward` on all rows."""
        return self.forward(jacobian)

    def forward(self, jacobian: Tensor, present: Tensor | None = None) -> Tensor:
        if jacobian.shape[0] != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} gradient rows, got {jacobian.shape[0]}")
        self.allocate(jacobian.shape[1], jacobian.dtype, jacobian.device)
        if present is None:
            present = torch.ones(self.num_tasks, dtype=torch.bool, device=jacobian.device)
        index = present.nonzero().flatten()
        if not len(index):
            return torch.zeros_like(jacobian[0])
        losses = self.losses
        if losses is None:
            raise RuntimeError("the window's losses were not given (use TrackedGradientWeighting)")
        return self.step(jacobian[index], index, losses.to(jacobian)[index])


class TrackedGradientWeighting(GradientWeighting):
    """:class:`GradientWeighting` whose :class:`TrackedAggregator` also gets the task losses,
    averaged over processes (see the module). Logs ``weight/<t>`` (the aggregator's) besides the
    gradient cosines.

    Args:
        tasks: task names, in the run's order.
        aggregator: the method.
        seed: seeds the aggregator's random choices (none of the methods here draws).
        loss_scale: an optional module mapping the task losses before their gradients are taken
            (DB-MTL's logarithm).
    """

    aggregator: TrackedAggregator

    def __init__(
        self,
        tasks: list[str],
        aggregator: TrackedAggregator,
        seed: int = 0,
        loss_scale: nn.Module | None = None,
    ) -> None:
        super().__init__(tasks, aggregator, seed, loss_scale=loss_scale)
        self._sums: Tensor | None = None
        self._counts: Tensor | None = None

    def bind_shared(self, shared: list[nn.Parameter]) -> None:
        params = [p for p in shared if p.requires_grad]
        if not params:
            return
        dtype = torch.float32
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
        self.aggregator.allocate(sum(p.numel() for p in params), dtype, params[0].device)

    def observe_losses(self, losses: Tensor, known: Tensor) -> None:
        """A micro-batch's process-averaged task losses ``[T]`` (``known``: some process had the
        task with a finite loss), before their gradients are taken. Default: nothing."""

    def backward(
        self, bundle: LossBundle, shared: list[nn.Parameter], accelerator: Any
    ) -> dict[str, float]:
        losses = checked_task_losses(bundle, self.tasks)
        dtype = torch.float32  # float64 losses stay float64
        for loss in losses.values():
            dtype = torch.promote_types(dtype, loss.dtype)
        like = torch.zeros((), dtype=dtype, device=self.aggregator.tracked.device)
        values, present = loss_vector(losses, self.tasks, like)
        mask = present.to(values.dtype)
        total, count = process_mean(torch.stack([values * mask, mask]), accelerator)
        known = count > 0
        micro = torch.where(known, total / torch.where(known, count, torch.ones_like(count)), 0)
        self.observe_losses(micro, known)
        self._sums = total if self._sums is None else self._sums + total
        self._counts = count if self._counts is None else self._counts + count
        sync = getattr(accelerator, "sync_gradients", True)
        if sync:
            seen = self._counts > 0
            safe = torch.where(seen, self._counts, torch.ones_like(self._counts))
            self.aggregator.losses = torch.where(seen, self._sums / safe, 0)
            self._sums = self._counts = None
        logs = super().backward(bundle, shared, accelerator)
        if sync:
            weights = self.aggregator.weight_logs().tolist()
            logs.update({f"weight/{t}": w for t, w in zip(self.tasks, weights, strict=True)})
        return logs
