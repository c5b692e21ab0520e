"""``dwa``: Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019; ``lorenmt/mtan`` im2im_pred/utils.py, LibMTL ``DWA``, torchjd ``DWA``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from unirep.losses.bundle import LossBundle
from unirep.weighting.base import WEIGHTINGS, LossWeighting, process_mean
from unirep.weighting.loss_stats import (
    add_terms,
    checked_task_losses,
    finite_float,
    loss_vector,
    positive_int,
)


@WEIGHTINGS.register("dwa")
class DWAWeighting(LossWeighting):
    """``L = Σ_{t in batch} λ_t·L_t + Σ_j J_j``, ``λ = T·softmax(w/τ)``,
    ``w_t = L̄_t(k−1)/L̄_t(k−2)``.

    ``L̄_t(k)`` is task ``t``'s loss averaged over period ``k``; the weights of period ``k`` use the
    two previous periods, and ``λ = 1`` during the first two periods. ``τ`` is ``temperature``
    (2.0, the paper's). ``T`` is the number of tasks of the run, so ``Σ_t λ_t = T``.

    The period. The paper's period is an epoch; here it is ``period`` optimizer steps (default
    50), counted in calls to :meth:`after_step` (one per optimizer step), so gradient accumulation
    does not change its length. Training streams have no epochs, and a per-step version is noisy
    (nash-mtl smooths DWA over 25 iterations); ``restrained_uncertainty`` uses ``period=1``.

    The average, exactly. At every micro-batch (:meth:`combine`) the ``[T]`` vector of the task
    losses is averaged over processes, per task over the processes whose batch has it
    (one all-reduce of ``[2, T]``): ``sums += Σ_p L_{p,t}/P`` and
    ``counts += (#processes with t)/P``. When a period closes
    ``L̄_t = sums_t/counts_t``: the mean of task ``t``'s loss over every (micro-batch, process) that
    had it, i.e. the per-batch mean torchjd's ``DWA`` takes with one process. Averaging each
    micro-batch over processes, rather than once per period, keeps every buffer identical on every
    process at all times (DDP broadcasts rank 0's buffers at each forward).

    Partial labels and bad values. A task absent from a batch, or with a non-finite loss (a step
    the trainer will skip), adds nothing to the sums. A task absent for a whole period keeps its
    previous average (``w_t = 1`` next), and a task with fewer than two averages so far gets
    ``w_t = 1``; a zero or non-finite ratio is replaced by 1. State never holds a NaN.

    State (buffers, checkpointed): ``sums``, ``counts`` (``[T]``, the open period), ``history``
    (``[2, T]``: the averages of the two previous periods, older first), ``known`` (``[2, T]``,
    which of those exist), ``steps`` (optimizer steps so far) and ``lambdas`` (``[T]``, current
    weights, logged as ``weight/<t>``).

    Args:
        tasks: task names, in the run's order.
        temperature: τ > 0.
        period: optimizer steps per averaging period (>= 1).

    Shapes: every loss term is a scalar; the result is a scalar.
    """

    sums: Tensor
    counts: Tensor
    history: Tensor
    known: Tensor
    steps: Tensor
    lambdas: Tensor

    def __init__(self, tasks: list[str], temperature: float = 2.0, period: int = 50) -> None:
        super().__init__(tasks)
        self.temperature = finite_float("temperature", temperature, low=0.0, strict=True)
        self.period = positive_int("period", period)
        count = len(self.tasks)
        self.register_buffer("sums", torch.zeros(count))
        self.register_buffer("counts", torch.zeros(count))
        self.register_buffer("history", torch.zeros(2, count))
        self.register_buffer("known", torch.zeros(2, count, dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("lambdas", torch.ones(count))
        self._index = {task: i for i, task in enumerate(self.tasks)}

    def observe(self, losses: dict[str, Tensor], accelerator: Any) -> None:
        """Add one micro-batch's (process-averaged) losses to the open period."""
        values, present = loss_vector(losses, self.tasks, self.sums)
        mask = present.to(values.dtype)
        total, count = process_mean(torch.stack([values * mask, mask]), accelerator)
        self.sums += total
        self.counts += count

    def combine(self, bundle: LossBundle, accelerator: Any = None) -> Tensor:
        losses = checked_task_losses(bundle, self.tasks)
        self.observe(losses, accelerator)
        terms = [self.lambdas[self._index[t]] * loss for t, loss in losses.items()]
        return add_terms(terms, bundle.joint_loss())

    def after_step(self, task_losses: dict[str, Tensor], accelerator: Any) -> None:
        self.steps += 1
        if int(self.steps) % self.period == 0:
            self._close_period()

    @torch.no_grad()
    def _close_period(self) -> None:
        seen = self.counts > 0
        safe = torch.where(seen, self.counts, torch.ones_like(self.counts))
        average = torch.where(seen, self.sums / safe, self.history[1])
        self.history.copy_(torch.stack([self.history[1], average]))
        self.known.copy_(torch.stack([self.known[1], seen | self.known[1]]))
        self.sums.zero_()
        self.counts.zero_()
        both = self.known[0] & self.known[1]
        older, newer = self.history[0], self.history[1]
        ratio = newer / torch.where(older != 0, older, torch.ones_like(older))
        usable = both & (older != 0) & torch.isfinite(ratio)
        ratio = torch.where(usable, ratio, torch.ones_like(ratio))
        dynamic = len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0)
        # λ = 1 exactly until some task has two averages (no host sync)
        self.lambdas.copy_(torch.where(both.any(), dynamic, torch.ones_like(dynamic)))

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.lambdas.tolist(), strict=True))
