"""``moco``: Multi-objective gradient Correction (Fernando, Shen, Liu, Chaudhury, Murugesan & Chen,
"Mitigating gradient bias in multi-objective learning: a provably convergent approach", ICLR 2023;
LibMTL ``MoCo``, written with the authors' code, whose update and defaults this follows)."""

from __future__ import annotations

import torch
from torch import Tensor

from unirep.weighting.base import WEIGHTINGS, Weighting
from unirep.weighting.loss_stats import finite_float
from unirep.weighting.tracked import TrackedAggregator, TrackedGradientWeighting

NORM_EPS = 1e-8


class MoCoAggregator(TrackedAggregator):
    """MoCo's tracked gradients ``Y`` (``[T, n]``) and weights ``λ`` (``[T]``).

    At optimizer step ``k`` (1, 2, ...), with ``g_t`` the window's process-averaged gradient of
    task ``t`` and ``L_t`` its loss (LibMTL ``MoCo.backward``):

    - ``ĝ_t = g_t / (‖g_t‖ + 1e-8) · L_t`` (the gradient normalised, scaled by the loss);
    - ``Y ← Y − β_k (Y − Ĝ)`` with ``β_k = beta / k^beta_sigma`` (``Y₀ = 0``);
    - ``λ ← softmax(λ − γ_k (Y Yᵀ + ρ I) λ)`` with ``γ_k = gamma / k^gamma_sigma`` (``λ₀ = 1/T``);
    - direction ``d = Yᵀ λ`` (``[n]``).

    Tasks absent from the whole window keep their ``Y`` row and ``λ``; the present ones ``P`` are
    updated among themselves (``λ_P ← Σλ_P · softmax(λ_P − γ_k (Y_P Y_Pᵀ + ρI) λ_P)``) and
    ``d = Y_Pᵀ λ_P``. With every task present this is LibMTL's step exactly.

    State (buffers): ``tracked`` (``Y``), ``lambd`` (float64) and ``steps``.
    """

    lambd: Tensor
    steps: Tensor

    def __init__(
        self,
        num_tasks: int,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
    ) -> None:
        super().__init__(num_tasks)
        self.beta = finite_float("beta", beta, low=0.0)
        self.beta_sigma = finite_float("beta_sigma", beta_sigma, low=0.0)
        self.gamma = finite_float("gamma", gamma, low=0.0)
        self.gamma_sigma = finite_float("gamma_sigma", gamma_sigma, low=0.0)
        self.rho = finite_float("rho", rho, low=0.0)
        self.register_buffer(
            "lambd", torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
        )
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def step(self, jacobian: Tensor, index: Tensor, losses: Tensor) -> Tensor:
        self.steps += 1
        k = float(self.steps)
        norms = jacobian.norm(dim=1, keepdim=True)
        normalised = jacobian / (norms + NORM_EPS) * losses[:, None]
        y = self.tracked[index]
        y = y - (self.beta / k**self.beta_sigma) * (y - normalised)
        self.tracked[index] = y
        lambd = self.lambd[index.to(self.lambd.device)]
        gram = (y @ y.T).to(torch.float64) + self.rho * torch.eye(len(index), dtype=torch.float64,
                                                                   device=y.device)  # fmt: skip
        lambd = lambd.to(y.device)
        updated = torch.softmax(lambd - (self.gamma / k**self.gamma_sigma) * gram @ lambd, dim=0)
        if len(index) < self.num_tasks:  # absent tasks keep their share of the simplex
            updated = updated * lambd.sum()
        self.lambd[index.to(self.lambd.device)] = updated.to(self.lambd.device)
        return updated.to(y.dtype) @ y

    def weight_logs(self) -> Tensor:
        return self.lambd.detach().cpu()


@WEIGHTINGS.register("moco")
def moco(
    tasks: list[str],
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
) -> Weighting:
    """MoCo (Fernando et al., ICLR 2023) on the shared parameters, LibMTL's defaults
    (``MoCo_beta`` 0.5, ``MoCo_beta_sigma`` 0.5, ``MoCo_gamma`` 0.1, ``MoCo_gamma_sigma`` 0.5,
    ``MoCo_rho`` 0): see :class:`MoCoAggregator`. Heads get the plain loss sum (as LibMTL)."""
    aggregator = MoCoAggregator(len(tasks), beta, beta_sigma, gamma, gamma_sigma, rho)
    return TrackedGradientWeighting(tasks, aggregator)
