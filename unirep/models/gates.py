"""Learned gates between a shared and a private path, and the seeded Gumbel noise they draw.

:class:`SMTLGates` is SMTL's gate (Guo, Ye & Zhang, arXiv 2111.10601; reference code
``Pengxin-Guo/SMTL``) for any set of tasks or domains, used by the dense
(:class:`~unirep.models.sharing.SMTLNet`) and the multi-domain
(:class:`~unirep.models.sharing.SMTLMultiDomainNet`) students. :func:`seeded_gumbel` is the noise
of every Gumbel-softmax of unirep's students: drawn from a seed and a draw counter kept in the
checkpoint, so a resumed run draws what the uninterrupted one draws, and every process of a
distributed run draws the same (DDP broadcasts the counter with the buffers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATES = ("softmax", "sigmoid", "lite")
"""SMTL's gates: ``softmax`` (v1, α¹ + α² = 1), ``sigmoid`` (v2, each α in [0, 1]) and ``lite``
(v3, a hard Gumbel-softmax that picks one path per task)."""
PATHS = ("public", "private")
_SEED_MIX = 0x9E3779B97F4A7C15  # spreads (seed, draw) over the generator's seeds


def seeded_gumbel(
    shape: torch.Size | tuple[int, ...], seed: int, draw: int, dtype: torch.dtype
) -> Tensor:
    """Standard Gumbel noise ``[*shape]`` (on the CPU) from ``seed`` and the draw number."""
    generator = torch.Generator().manual_seed((seed * _SEED_MIX + draw) % 2**63)
    uniform = torch.rand(shape, generator=generator, dtype=dtype)
    return -torch.log((-torch.log(uniform.clamp_min(1e-20))).clamp_min(1e-20))


class SMTLGates(nn.Module):
    """One gate per name (task or domain): the weights ``(α¹ public, α² private)`` ``[N, 2]``.

    - ``softmax``: ``α = softmax(a)`` over a pair of logits (0.5 / 0.5 at start);
    - ``sigmoid``: ``α = sigmoid(a)``, each coordinate on its own;
    - ``lite``: one logit per name; in training a hard Gumbel-softmax, straight-through, on
      ``[1 − σ(a), σ(a)]`` at temperature ``tau`` (0.1 in the reference); in evaluation the
      one-hot of ``σ(a) ≥ 0.5`` (the private path).

    ``selected`` (``{name: "public" | "private"}``) fixes the choice: no parameters, one-hot
    weights (what a Lite network is exported as).
    """

    def __init__(
        self,
        names: list[str],
        gate: str = "softmax",
        tau: float = 0.1,
        selected: dict[str, str] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.names = list(names)
        self.gate, self.tau, self.seed = gate, float(tau), int(seed)
        self.selected = dict(selected) if selected is not None else None
        if self.selected is None:
            self.logits = nn.Parameter(torch.zeros(len(names), 1 if gate == "lite" else 2))
            self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def forward(self) -> Tensor:
        """``[N, 2]``: the weights this forward uses (a Lite gate in training draws anew)."""
        if self.selected is not None:
            pick = [1.0 if self.selected[n] == "private" else 0.0 for n in self.names]
            return torch.tensor([[1.0 - p, p] for p in pick])
        a = self.logits
        if self.gate == "softmax":
            return torch.softmax(a, dim=1)
        if self.gate == "sigmoid":
            return torch.sigmoid(a)
        p = torch.sigmoid(a[:, 0])
        if not self.training:
            pick = (p >= 0.5).to(a.dtype)
            return torch.stack([1 - pick, pick], dim=1)
        probs = torch.stack([1 - p, p], dim=1)
        gumbel = seeded_gumbel(probs.shape, self.seed, int(self.draws), probs.dtype)
        self.draws += 1
        soft = torch.softmax((probs + gumbel.to(probs.device)) / self.tau, dim=1)
        hard = F.one_hot(soft.argmax(dim=1), 2).to(soft.dtype)
        return hard - soft.detach() + soft  # the hard choice, with the soft gradient

    def chosen(self) -> dict[str, str]:
        """``{name: "public" | "private"}``: the Lite gate's evaluation choice, or the fixed
        one."""
        if self.selected is not None:
            return dict(self.selected)
        if self.gate != "lite":
            raise ValueError(f"only the lite gate picks one path per task, not {self.gate!r}")
        picks = (torch.sigmoid(self.logits[:, 0].detach()) >= 0.5).tolist()
        return {n: "private" if p else "public" for n, p in zip(self.names, picks, strict=True)}

    def private_weight(self) -> Tensor:
        """``[N]``: each name's weight on its private path as evaluation uses it (for the Lite
        gate the probability σ(a) of picking it), detached, for the training log."""
        a = self.logits.detach()
        if self.gate == "softmax":
            return torch.softmax(a, dim=1)[:, 1]
        return torch.sigmoid(a[:, -1])
