"""Backbones: any timm model by name (``pretrained=False``), including unirep's own registrations.

``build_backbone(name)`` returns a module mapping images ``[B, 3, H, W]`` to pooled features
``[B, C]`` and the feature width ``C``. Nothing is downloaded: pretrained weights are refused.
"""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from unirep.errors import UnknownNameError
from unirep.models import resnet_decathlon, segnet  # noqa: F401  (register unirep's own timm models)


def is_backbone(name: str) -> bool:
    """Whether timm (with unirep's registrations) knows the model ``name``."""
    return timm.is_model(name)


def check_backbone(name: str) -> None:
    """Raise a clear error for an unknown backbone name."""
    if not is_backbone(name):
        ours = ", ".join(sorted([*timm.list_models("*decathlon*"), "segnet_mtan"]))
        close = timm.list_models(f"*{name[:4]}*")[:10] if len(name) >= 4 else []
        hint = f"; similar timm names: {', '.join(close)}" if close else ""
        raise UnknownNameError(
            f"unknown backbone {name!r}: not a timm model name (unirep's own: {ours}; "
            f"see timm.list_models()){hint}"
        )


def build_backbone(name: str, **kwargs: Any) -> tuple[nn.Module, int]:
    """Create ``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)``.

    Returns the module (images ``[B, 3, H, W]`` → pooled features ``[B, C]``) and ``C``.
    """
    check_backbone(name)
    if kwargs.get("pretrained"):
        raise ValueError("pretrained weights are never downloaded; set pretrained=false")
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    return model, int(model.num_features)
