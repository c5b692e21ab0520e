"""``rlw``: Random Loss Weighting (Lin et al., "Reasonable Effectiveness of Random Weighting: A
Litmus Test for Multi-Task Learning", TMLR 2022, arXiv 2111.10603; LibMTL ``RLW``, Kurin et al.'s
port ``optimizers/rlw.py``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from unirep.losses.bundle import LossBundle
from unirep.weighting.base import WEIGHTINGS, LossWeighting
from unirep.weighting.loss_stats import add_terms, checked_task_losses

DISTRIBUTIONS = (
    "gaussian",
    "uniform",
    "dirichlet",
    "random_normal",
    "bernoulli",
    "constrained_bernoulli",
)


@WEIGHTINGS.register("rlw")
class RLWWeighting(LossWeighting):
    """``L = Σ_{t in batch} λ_t·L_t + Σ_j J_j`` with ``λ`` drawn at random for every optimizer step.

    ``λ = c·f(λ̃)``, ``λ̃ ~ distribution`` (``[T]``):

    - ``gaussian`` (default; LibMTL's ``normal``): ``softmax(N(0, I))``;
    - ``uniform``: ``softmax(U(0, 1)^T)``;
    - ``dirichlet``: ``Dirichlet(1, ..., 1)`` (normalised ``Exp(1)`` draws, the same law);
    - ``random_normal``: ``softmax(N(μ, diag σ²))`` with ``μ, σ ~ U(0, 1)^T`` drawn once, at
      construction (buffers ``mu``, ``std``);
    - ``bernoulli``: ``b ~ Bernoulli(0.5)^T`` redrawn while all zero, ``b/Σb``;
    - ``constrained_bernoulli``: one task chosen uniformly gets everything.

    ``scale="mean"`` keeps ``Σλ = 1`` (LibMTL, nash-mtl); ``scale="sum"`` makes ``Σλ = T`` (Kurin's
    port; under SGD a T× larger step than ``mean``). The weights are over every task of the run:
    a task absent from the batch contributes nothing and the others are not renormalised.

    Randomness. Every draw uses its own ``torch.Generator`` (CPU) seeded with ``seed + calls``,
    where ``calls`` (a long buffer) counts the draws, so every process draws the same weights, a
    resume draws what the uninterrupted run would have, and the global RNG is never touched.
    ``random_normal``'s ``μ, σ`` are draw 0. The weights of the first step are drawn at
    construction; :meth:`after_step` (once per optimizer step) draws those of the next step, so the
    micro-batches of one accumulation window share one draw. A step the trainer skips (non-finite)
    keeps its weights for the retry.

    State (buffers): ``calls``, ``lambdas`` (``[T]``, the current weights, logged as
    ``weight/<t>``), and ``mu``, ``std`` (``[T]``, used by ``random_normal`` only).

    Args:
        tasks: task names, in the run's order.
        distribution: one of :data:`DISTRIBUTIONS`.
        scale: ``"mean"`` or ``"sum"``.
        seed: base seed of the draws.

    Shapes: every loss term is a scalar; the result is a scalar.
    """

    calls: Tensor
    lambdas: Tensor
    mu: Tensor
    std: Tensor

    def __init__(
        self, tasks: list[str], distribution: str = "gaussian", scale: str = "mean", seed: int = 0
    ) -> None:
        super().__init__(tasks)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"rlw distribution must be one of {', '.join(DISTRIBUTIONS)}; got {distribution!r}"
            )
        if scale not in ("mean", "sum"):
            raise ValueError(f"rlw scale must be 'mean' (Σλ = 1) or 'sum' (Σλ = T), got {scale!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"rlw seed must be an integer, got {seed!r}")
        self.distribution = distribution
        self.scale = scale
        self.seed = int(seed)
        count = len(self.tasks)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("mu", torch.zeros(count))
        self.register_buffer("std", torch.zeros(count))
        if distribution == "random_normal":
            gen = self._generator()
            self.mu.copy_(torch.rand(count, generator=gen))
            self.std.copy_(torch.rand(count, generator=gen))
        self.register_buffer("lambdas", self._draw())
        self._index = {task: i for i, task in enumerate(self.tasks)}

    def _generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with ``seed + calls``; counts the draw."""
        gen = torch.Generator().manual_seed(self.seed + int(self.calls))
        self.calls += 1
        return gen

    @torch.no_grad()
    def _draw(self) -> Tensor:
        """The next ``[T]`` weights (CPU, float32)."""
        count = len(self.tasks)
        gen = self._generator()
        if self.distribution == "gaussian":
            raw = torch.softmax(torch.randn(count, generator=gen), dim=0)
        elif self.distribution == "uniform":
            raw = torch.softmax(torch.rand(count, generator=gen), dim=0)
        elif self.distribution == "dirichlet":
            gamma = torch.empty(count).exponential_(generator=gen)  # Gamma(1, 1)
            raw = gamma / gamma.sum()
        elif self.distribution == "random_normal":
            noise = torch.randn(count, generator=gen)
            raw = torch.softmax(self.mu.cpu() + self.std.cpu() * noise, dim=0)
        elif self.distribution == "bernoulli":
            coins = torch.zeros(count)
            while coins.sum() == 0:
                coins = torch.bernoulli(torch.full((count,), 0.5), generator=gen)
            raw = coins / coins.sum()
        else:  # constrained_bernoulli
            raw = torch.zeros(count)
            raw[torch.randint(count, (1,), generator=gen)] = 1.0
        return raw * count if self.scale == "sum" else raw

    def combine(self, bundle: LossBundle, accelerator: Any = None) -> Tensor:
        losses = checked_task_losses(bundle, self.tasks)
        terms = [self.lambdas[self._index[t]] * loss for t, loss in losses.items()]
        return add_terms(terms, bundle.joint_loss())

    def after_step(self, task_losses: dict[str, Tensor], accelerator: Any) -> None:
        self.lambdas.copy_(self._draw())

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.lambdas.tolist(), strict=True))
