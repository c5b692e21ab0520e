"""``ntkmtl``: NTKMTL (Qin, Wang, Liao & Yan, "NTKMTL: Mitigating Task Imbalance in Multi-Task
Learning from Neural Tangent Kernel Perspective", NeurIPS 2025, arXiv 2510.18258; the authors'
``jianke0604/NTKMTL`` methods/weight_methods.py ``NTKMTL``, its default variant ``n = 1``)."""

from __future__ import annotations

from torch import Tensor

from unirep.weighting.aggregators import AGGREGATORS, Aggregator
from unirep.weighting.base import WEIGHTINGS, Weighting
from unirep.weighting.gradient import GradientWeighting
from unirep.weighting.loss_stats import finite_float

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


@AGGREGATORS.register("ntkmtl")
class NTKMTLAggregator(Aggregator):
    """``w_t = T · (tr(G) / G_tt)^ntk_exp`` on the Gramian ``G = J Jᵀ`` (``[T, T]``).

    With one sample per task (the reference's ``n = 1``), task ``t``'s NTK is the scalar
    ``‖g_t‖² = G_tt``; weighting each gradient by ``(Σ_s λ_s / λ_t)^ntk_exp`` balances the tasks'
    convergence rates (the paper's square root: ``ntk_exp = 0.5``). The reference multiplies the
    combination by ``T`` "to match the sum loss", then clips the shared gradient to
    ``max_norm`` (``clip_grad_norm_``): here ``w`` is scaled by
    ``min(1, max_norm / (‖wᵀJ‖ + 1e-6))`` (``max_norm = 0``: no clipping), ``‖wᵀJ‖ = √(wᵀGw)``.
    Depends on the Gramian only. Absent tasks get 0; ``T`` and the trace are then the present
    tasks'.
    """

    def __init__(self, num_tasks: int, ntk_exp: float = 0.5, max_norm: float = 1.0) -> None:
        super().__init__(num_tasks)
        self.ntk_exp = finite_float("ntk_exp", ntk_exp, low=0.0)
        self.max_norm = finite_float("max_norm", max_norm, low=0.0)

    def weights(self, gramian: Tensor) -> Tensor:
        diagonal = gramian.diagonal()
        w = (diagonal.sum() / diagonal).pow(self.ntk_exp) * self.num_tasks
        if self.max_norm > 0:
            norm = (w @ gramian @ w).clamp_min(0).sqrt()
            w = w * (self.max_norm / (norm + CLIP_EPS)).clamp_max(1.0)
        return w


@WEIGHTINGS.register("ntkmtl")
def ntkmtl(
    tasks: list[str],
    ntk_exp: float = 0.5,
    max_norm: float = 1.0,
    path: str = "auto",
    seed: int = 0,
) -> Weighting:
    """NTKMTL (Qin et al., NeurIPS 2025), the reference's defaults (``--ntk_exp 0.5``, the paper's
    square root; its NYUv2 script uses 0.75; ``--max_norm 1.0``): see
    :class:`NTKMTLAggregator`. Heads get the plain loss sum (as the reference). Gramian-only:
    ``path`` as the other Gramian methods (:class:`GradientWeighting`)."""
    aggregator = NTKMTLAggregator(len(tasks), ntk_exp, max_norm)
    return GradientWeighting(tasks, aggregator, seed, path=path)
