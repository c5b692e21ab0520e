"""Alignment adapters: small per-domain maps from student to teacher feature space.

Universal Representations (Li, Liu & Bilen, IJCV 2023, §3): each domain ``d`` has an adapter
``A_d`` applied to the student's shared feature before the feature-distillation loss; adapters are
used only in the loss and dropped at export. Input ``[B, C_s]`` (or ``[B, C_s, H, W]``), output
``[B, C_t]`` (or ``[B, C_t, H, W]``).
"""

from __future__ import annotations

from torch import Tensor, nn

from unirep.registry import Registry

ADAPTERS: Registry[nn.Module] = Registry("adapter")


def _apply_channelwise(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply a ``[.., C]`` layer to ``[B, C]`` or ``[B, C, H, W]`` inputs along dim 1."""
    if x.dim() == 2:
        return layer(x)
    return layer(x.movedim(1, -1)).movedim(-1, 1)


@ADAPTERS.register("linear")
class LinearAdapter(nn.Module):
    """A bias-free linear map (URL's 1×1 convolution), identity-initialised when square."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=False)
        if in_dim == out_dim:
            nn.init.eye_(self.proj.weight)
        else:
            nn.init.xavier_normal_(self.proj.weight)

    def forward(self, x: Tensor) -> Tensor:
        return _apply_channelwise(self.proj, x)


@ADAPTERS.register("mlp")
class MLPAdapter(nn.Module):
    """URL's ``nonlinear`` option: linear(C_s→hidden)–ReLU–linear(hidden→C_t), hidden = 2·C_s."""

    def __init__(self, in_dim: int, out_dim: int, hidden_mult: float = 2.0) -> None:
        super().__init__()
        hidden = int(in_dim * hidden_mult)
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, out_dim, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        return _apply_channelwise(self.net, x)


@ADAPTERS.register("identity")
class IdentityAdapter(nn.Module):
    """No adapter (the student feature is compared as it is; needs C_s == C_t for L2)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return x
