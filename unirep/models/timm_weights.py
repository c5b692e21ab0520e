"""Weights for unirep's own timm architectures come from a local file only, never a download.

``resnet26_decathlon``, ``resnet_decathlon_tiny`` and ``segnet_mtan`` have no hosted weights: their
entry points accept ``pretrained=True`` only with a weights file (what ``timm.create_model(
"local-dir:<student>/backbone", pretrained=True)`` or ``pretrained_cfg_overlay=dict(file=...)``
gives), so a missing file is an error, never a random initialisation. timm builds them only after
``import unirep`` registers them; without unirep, the export's ``backbone/model.pt2`` (a
``torch.export`` program, see :mod:`unirep.pipeline.export`) runs the same weights with torch
alone.
"""

from __future__ import annotations

import abc
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


def weights_given(kwargs: dict[str, Any]) -> bool:
    """Whether a timm entry point's ``pretrained_cfg`` or ``pretrained_cfg_overlay`` names the
    weights to load (``file`` or ``state_dict``, as a unirep export's ``local-dir:`` does)."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay"):
        cfg = kwargs.get(key)
        if isinstance(cfg, dict) and (cfg.get("file") or cfg.get("state_dict") is not None):
            return True
        if cfg is not None and (getattr(cfg, "file", None) or getattr(cfg, "state_dict", None)):
            return True
    return False


def refuse_download(name: str, pretrained: bool, kwargs: dict[str, Any]) -> None:
    """Refuse ``pretrained=True`` without a weights file: unirep ships no weights to download."""
    if pretrained and not weights_given(kwargs):
        raise ValueError(
            f"no pretrained weights are shipped for {name}; pass pretrained=False, or load a "
            "unirep export: timm.create_model('local-dir:<student>/backbone', pretrained=True) "
            "or pretrained_cfg_overlay=dict(file='<student>/backbone/model.safetensors', "
            "num_classes=0)"
        )


class PooledHead(nn.Module, abc.ABC):
    """timm's head for unirep's own trunks: global average pooling, dropout (``drop_rate``), then
    ``fc`` (``nn.Identity`` with ``num_classes=0``). A subclass sets ``drop_rate`` and ``fc`` and
    defines ``forward_features`` ``[B, 3, H, W] → [B, C, h, w]``."""

    drop_rate: float
    fc: nn.Module

    @abc.abstractmethod
    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` → the trunk's last feature map ``[B, C, h, w]``."""

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``[B, C, h, w]`` → pooled ``[B, C]`` or logits ``[B, num_classes]``."""
        x = x.mean(dim=(2, 3))
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
