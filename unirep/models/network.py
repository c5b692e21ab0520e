"""The multi-domain network shared by teachers (one domain) and the student (all domains).

A shared backbone, one linear head per domain and, for a distilled student, one alignment adapter
per domain (Universal Representations, Li, Liu & Bilen, IJCV 2023). Everything trainable lives in
this one module, so it alone goes to the optimizer and to ``accelerator.prepare``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from unirep.models.adapters import ADAPTERS
from unirep.models.backbones import build_backbone
from unirep.models.residual_adapters import (
    active_domain,
    attach_parallel_adapters,
    domain_specific_modules,
)


class MultiDomainNet(nn.Module):
    """Backbone → per-domain head; adapters map features to each teacher's space.

    ``forward(images)`` takes ``{domain: [B_d, 3, H, W]}`` and returns, per domain,
    ``{"features": [B_d, C], "logits": [B_d, K_d]}`` plus ``"aligned": [B_d, C_t]`` when the net
    has adapters. Domains whose batches share a shape go through the backbone as one batch, as in
    URL (so batch-norm statistics mix domains, as there).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: dict[str, int],
        adapters: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.heads = nn.ModuleDict({d: nn.Linear(feature_dim, k) for d, k in num_classes.items()})
        self.adapters = nn.ModuleDict(adapters or {})
        self._domain_specific = any(True for _ in domain_specific_modules(backbone))

    @property
    def domains(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, images: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        unknown = set(images) - set(self.heads)
        if unknown:
            raise KeyError(f"no head for domain(s) {sorted(unknown)}; heads: {self.domains}")
        features = self._shared_features(images)
        out: dict[str, dict[str, Tensor]] = {}
        for domain, feat in features.items():
            out[domain] = {"features": feat, "logits": self.heads[domain](feat)}
            if domain in self.adapters:
                out[domain]["aligned"] = self.adapters[domain](feat)
        return out

    @property
    def domain_specific(self) -> bool:
        """Whether the backbone has per-domain parts (residual adapters, per-domain BN)."""
        return self._domain_specific

    def _shared_features(self, images: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.domain_specific:  # URL (RA): each domain through its own adapters and BN
            out = {}
            for d, x in images.items():
                with active_domain(self.backbone, d):
                    out[d] = self.backbone(x)
            return out
        shapes = {tuple(x.shape[1:]) for x in images.values()}
        if len(shapes) == 1 and len(images) > 1:
            sizes = [x.shape[0] for x in images.values()]
            feats = self.backbone(torch.cat(list(images.values())))
            return dict(zip(images, feats.split(sizes), strict=True))
        return {d: self.backbone(x) for d, x in images.items()}

    def classify(self, images: Tensor, domain: str) -> Tensor:
        """Logits ``[B, K_d]`` for one domain's images ``[B, 3, H, W]`` (evaluation path)."""
        if self.domain_specific:
            with active_domain(self.backbone, domain):
                return self.heads[domain](self.backbone(images))
        return self.heads[domain](self.backbone(images))

    def head_and_backbone_state(self) -> dict[str, Tensor]:
        """The exported weights: backbone and heads, without alignment adapters."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("adapters.")}


def build_network(
    backbone: str,
    backbone_kwargs: dict[str, Any],
    num_classes: dict[str, int],
    adapter: str | None = None,
    adapter_kwargs: dict[str, Any] | None = None,
    teacher_dims: dict[str, int] | None = None,
    residual_adapters: bool = False,
    backbone_state: dict[str, Tensor] | None = None,
) -> MultiDomainNet:
    """Build a :class:`MultiDomainNet`; with ``adapter``, one per domain to ``teacher_dims[d]``.

    ``backbone_state`` (e.g. a teacher's backbone) is loaded strictly before, with
    ``residual_adapters``, parallel 1×1 adapters and per-domain batch-norm are attached to the
    backbone (Rebuffi et al. 2018; URL (RA)); those stay in the model at test time.
    """
    net, dim = build_backbone(backbone, **backbone_kwargs)
    if backbone_state is not None:
        net.load_state_dict(backbone_state, strict=True)
    if residual_adapters:
        attach_parallel_adapters(net, list(num_classes))
    adapters = None
    if adapter is not None:
        dims = teacher_dims or {}
        adapters = {
            d: ADAPTERS.build(
                adapter, in_dim=dim, out_dim=dims.get(d, dim), **(adapter_kwargs or {})
            )
            for d in num_classes
        }
    return MultiDomainNet(net, dim, num_classes, adapters)


def count_parameters(module: nn.Module, exclude_prefix: str | None = None) -> int:
    """Number of parameters, optionally leaving out those under ``exclude_prefix``."""
    return sum(
        p.numel()
        for n, p in module.named_parameters()
        if exclude_prefix is None or not n.startswith(exclude_prefix)
    )
