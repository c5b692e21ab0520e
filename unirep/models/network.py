"""The multi-domain network shared by teachers (one domain) and the student (all domains).

A shared backbone and one linear head per domain (Universal Representations, Li, Liu & Bilen,
IJCV 2023). The alignment adapters of a distilled student are built by
:meth:`MultiDomainNet.build_aligners` and live beside the network in the phase's trainable module.
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
    """Backbone → one linear head per domain (a classification task bound to its own stream).

    ``forward(inputs)`` takes ``{domain: [B_d, 3, H, W]}`` and returns, per domain present,
    ``{"features": [B_d, C], "pred": [B_d, K_d]}`` (``pred`` are logits). Domains whose batches
    share a shape go through the backbone as one batch, as in URL (so batch-norm statistics mix
    domains, as there). Alignment adapters are not part of the network: they belong to the phase
    that trains it (:class:`~unirep.models.trainable.TrainableModule`), see :meth:`build_aligners`.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: dict[str, int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.heads = nn.ModuleDict({d: nn.Linear(feature_dim, k) for d, k in num_classes.items()})
        self._domain_specific = any(True for _ in domain_specific_modules(backbone))

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    @property
    def domains(self) -> list[str]:
        return self.tasks

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        unknown = set(inputs) - set(self.heads)
        if unknown:
            raise KeyError(f"no head for domain(s) {sorted(unknown)}; heads: {self.domains}")
        features = self._shared_features(inputs)
        return {
            domain: {"features": feat, "pred": self.heads[domain](feat)}
            for domain, feat in features.items()
        }

    def representation(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The shared representation: ``{domain: pooled backbone features [B_d, C]}`` for
        ``{domain: images [B_d, 3, H, W]}`` (a residual-adapter backbone with each domain's own
        adapters); what ``forward`` returns as ``"features"``, without the heads."""
        unknown = set(inputs) - set(self.heads)
        if unknown:
            raise KeyError(f"no head for domain(s) {sorted(unknown)}; heads: {self.domains}")
        return self._shared_features(inputs)

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
        """Logits ``[B, K_d]`` for one domain's images ``[B, 3, H, W]``."""
        return self({domain: images})[domain]["pred"]

    @property
    def trunk(self) -> nn.Module:
        """The shared backbone."""
        return self.backbone

    def shared_parameters(self) -> list[nn.Parameter]:
        """The backbone's trainable parameters: what every domain's loss reaches."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def build_aligners(
        self, teacher_dims: dict[str, int], adapter: str = "linear", **kwargs: Any
    ) -> nn.ModuleDict:
        """One alignment adapter per domain, pooled feature ``C`` → the teacher's width
        (URL, Li, Liu & Bilen, IJCV 2023, §3); each returns ``[aligned [B_d, C_t]]``."""
        return nn.ModuleDict(
            {
                d: FeatureAligner(
                    ADAPTERS.build(adapter, in_dim=self.feature_dim, out_dim=dim, **kwargs)
                )
                for d, dim in teacher_dims.items()
            }
        )


class FeatureAligner(nn.Module):
    """Applies an adapter to a network output's ``"features"`` (or the output ``key`` names):
    ``[A(features)]``."""

    def __init__(self, adapter: nn.Module, key: str = "features") -> None:
        super().__init__()
        self.adapter = adapter
        self.key = key

    def forward(self, output: dict[str, Tensor]) -> list[Tensor]:
        return [self.adapter(output[self.key])]


def build_network(
    backbone: str,
    backbone_kwargs: dict[str, Any],
    num_classes: dict[str, int],
    residual_adapters: bool = False,
    backbone_state: dict[str, Tensor] | None = None,
) -> MultiDomainNet:
    """Build a :class:`MultiDomainNet` with one head per domain (``num_classes[d]`` classes).

    ``backbone_state`` (e.g. a teacher's backbone) is loaded strictly before, with
    ``residual_adapters``, parallel 1×1 adapters and per-domain batch-norm are attached to the
    backbone (Rebuffi et al. 2018; URL (RA)); those stay in the model at test time.
    """
    net, dim = build_backbone(backbone, **backbone_kwargs)
    if backbone_state is not None:
        net.load_state_dict(backbone_state, strict=True)
    if residual_adapters:
        attach_parallel_adapters(net, list(num_classes))
    return MultiDomainNet(net, dim, num_classes)
