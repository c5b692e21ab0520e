"""``db_mtl``: Dual-Balancing Multi-Task Learning (Lin, Jiang, Ye, Zhang, Chen, Zhang & Kwok,
"Dual-Balancing for Multi-Task Learning", arXiv 2308.12029; LibMTL ``DB_MTL``, the authors' own
library, whose update and defaults this follows)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unirep.weighting.base import WEIGHTINGS, Weighting
from unirep.weighting.loss_stats import finite_float
from unirep.weighting.tracked import TrackedAggregator, TrackedGradientWeighting

LOG_EPS = 1e-8
NORM_EPS = 1e-8


class LogLossScale(nn.Module):
    """Loss-scale balancing: ``L_t ↦ L_t / (L̄_t + 1e-8)`` with ``L̄_t`` the micro-batch's loss
    averaged over processes (detached), whose gradient is ``∇ log(L̄_t + 1e-8)``, the gradient of
    the global batch's log-loss (with one process, LibMTL's ``log(L_t + 1e-8)`` exactly). Set by
    :meth:`DBMTLWeighting.observe_losses` before the gradients are taken."""

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.reference: Tensor | None = None  # [T], this micro-batch's

    def forward(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.reference is None:
            raise RuntimeError("db_mtl: the process-averaged losses were not observed")
        index = {t: i for i, t in enumerate(self.tasks)}
        ref = self.reference
        return {t: loss / (ref[index[t]].to(loss) + LOG_EPS) for t, loss in losses.items()}


class DBMTLAggregator(TrackedAggregator):
    """DB-MTL's gradient-magnitude balancing on the log-loss gradients.

    At optimizer step ``k`` (1, 2, ...), with ``g_t`` the window's process-averaged gradient of
    ``log(L_t + 1e-8)`` (see :class:`LogLossScale`), LibMTL ``DB_MTL.backward``:

    - ``ĝ_t ← g_t + β_k (ĝ_t − g_t)``, ``β_k = beta / k^beta_sigma`` (an EMA; ``ĝ₀ = 0``, no bias
      correction, as the reference);
    - ``α_t = max_s ‖ĝ_s‖ / (‖ĝ_t‖ + 1e-8)``;
    - direction ``d = Σ_t α_t ĝ_t`` (every task at the largest norm, summed).

    Tasks absent from the whole window keep their ``ĝ`` and are left out of the max and of ``d``.

    State (buffers): ``tracked`` (``ĝ``, ``[T, n]``), ``alpha`` (``[T]``, the last ``α``, logged)
    and ``steps``.
    """

    alpha: Tensor
    steps: Tensor

    def __init__(self, num_tasks: int, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        super().__init__(num_tasks)
        self.beta = finite_float("beta", beta, low=0.0)
        self.beta_sigma = finite_float("beta_sigma", beta_sigma, low=0.0)
        self.register_buffer("alpha", torch.ones(num_tasks))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def step(self, jacobian: Tensor, index: Tensor, losses: Tensor) -> Tensor:
        self.steps += 1
        beta = self.beta / float(self.steps) ** self.beta_sigma
        ema = jacobian + beta * (self.tracked[index] - jacobian)
        self.tracked[index] = ema
        norms = ema.norm(dim=1)
        alpha = norms.max() / (norms + NORM_EPS)
        self.alpha[index] = alpha.to(self.alpha)
        return alpha @ ema

    def weight_logs(self) -> Tensor:
        return self.alpha.detach().cpu()


class DBMTLWeighting(TrackedGradientWeighting):
    """DB-MTL: the task losses log-transformed (:class:`LogLossScale`; the heads get
    ``∇ Σ_t log(L_t + 1e-8)`` too, as LibMTL), their shared gradients balanced by
    :class:`DBMTLAggregator`. Joint terms are added as they are (not log-transformed)."""

    loss_scale: LogLossScale

    def __init__(self, tasks: list[str], beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        aggregator = DBMTLAggregator(len(tasks), beta, beta_sigma)
        super().__init__(tasks, aggregator, loss_scale=LogLossScale(tasks))

    def observe_losses(self, losses: Tensor, known: Tensor) -> None:
        negative = known & (losses < 0)
        if bool(negative.any()):
            t = self.tasks[int(negative.nonzero()[0])]
            raise ValueError(
                f"db_mtl takes the logarithm of each task's loss: task {t!r} has a negative loss "
                f"({float(losses[self.tasks.index(t)]):.4g}); use a non-negative loss or another "
                "weighting"
            )
        self.loss_scale.reference = losses.detach()


@WEIGHTINGS.register("db_mtl")
def db_mtl(tasks: list[str], beta: float = 0.9, beta_sigma: float = 0.0) -> Weighting:
    """DB-MTL (Lin et al. 2023) on the shared parameters, LibMTL's defaults (``DB_beta`` 0.9,
    ``DB_beta_sigma`` 0): log losses, an EMA of their gradients, each rescaled to the largest
    norm and summed (:class:`DBMTLWeighting`). The losses must be non-negative."""
    return DBMTLWeighting(tasks, beta, beta_sigma)
