"""The ResNet-26 of the Visual Decathlon papers, registered in timm's model registry.

Rebuffi, Bilen & Vedaldi, "Learning multiple visual domains with residual adapters" (NeurIPS 2017)
and "Efficient parametrization of multi-domain deep neural networks" (CVPR 2018); used as the
student and teachers of Universal Representations (Li, Liu & Bilen, IJCV 2023).

A 3×3 stem (32 channels), then three stages of basic blocks with widths 64/128/256, each stage
down-sampling by 2; shortcuts are parameter-free (average-pool + zero channel padding), a final
BN-ReLU, then global average pooling. Built for 64–72 px inputs (an 8×8 or 9×9 final map).
``resnet26_decathlon`` has 4 blocks per stage (about 6.1 M parameters);
``resnet_decathlon_tiny`` (widths 16/32/64, one block per stage) is for CPU-sized benchmarks.
Registered with ``timm.models.register_model``, so ``timm.create_model(name)`` builds them; no
weights are hosted, so ``pretrained=True`` needs a file: a unirep export's ``student/backbone/``
(``timm.create_model("local-dir:<student>/backbone", pretrained=True)``, see
:mod:`unirep.models.timm_weights`).

No stock timm architecture builds this network, whatever its arguments: timm's ``ResNet`` has a
stride-2 stem with max-pool (or a strided conv), convolutional projection shortcuts and no final
BN-ReLU. So a process without unirep cannot build it from ``config.json``; the export puts a
``torch.export`` program of it beside (``backbone/model.pt2``, see :mod:`unirep.pipeline.export`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from unirep.models.timm_weights import PooledHead, refuse_download


class ParameterFreeShortcut(nn.Module):
    """Down-sample by average pooling and pad the new channels with zeros (shape B×C×H×W)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, ceil_mode=True)
        if self.extra > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = (
            ParameterFreeShortcut(in_channels, out_channels, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class DecathlonResNet(PooledHead):
    """Three-stage ResNet of the decathlon papers, with timm's classifier interface.

    Input ``[B, 3, H, W]``; ``forward_features`` gives ``[B, widths[-1], H/8, W/8]``;
    ``forward`` gives logits ``[B, num_classes]`` or, with ``num_classes=0``, pooled features
    ``[B, num_features]``.
    """

    def __init__(
        self,
        widths: Sequence[int] = (64, 128, 256),
        blocks: Sequence[int] = (4, 4, 4),
        stem_width: int = 32,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks):
            raise ValueError(f"widths {list(widths)} and blocks {list(blocks)} differ in length")
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width)
        )
        stages: list[nn.Module] = []
        channels = stem_width
        for width, count in zip(widths, blocks, strict=True):
            layers = [BasicBlock(channels, width, 2)]
            layers += [BasicBlock(width, width, 1) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.final_norm = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.num_features = channels
        self.drop_rate = drop_rate
        self.num_classes = num_classes
        self.fc: nn.Module = nn.Linear(channels, num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """timm interface: replace the classifier (0 removes it)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` → ``[B, C, H/8, W/8]``."""
        return self.final_norm(self.stages(F.relu(self.stem(x))))


# timm reads the module's ``default_cfgs`` when registering: no hosted weights, so
# ``pretrained=True`` needs a file (a unirep export's ``student/backbone/``).
default_cfgs = generate_default_cfgs(
    {
        name: {
            "num_classes": 1000,
            "input_size": (3, 64, 64),
            "pool_size": (8, 8),
            "crop_pct": 64 / 72,
            "interpolation": "bilinear",
            "first_conv": "stem.0",
            "classifier": "fc",
            "license": "mit",
        }
        for name in ("resnet26_decathlon", "resnet_decathlon_tiny")
    }
)


def _create(
    variant: str, pretrained: bool, default: dict[str, Any], kwargs: dict[str, Any]
) -> DecathlonResNet:
    refuse_download(variant, pretrained, kwargs)
    return build_model_with_cfg(DecathlonResNet, variant, pretrained, **{**default, **kwargs})


@register_model
def resnet26_decathlon(pretrained: bool = False, **kwargs: Any) -> DecathlonResNet:
    """ResNet-26 of the decathlon papers (4 blocks × 3 stages, widths 64/128/256)."""
    default = {"widths": (64, 128, 256), "blocks": (4, 4, 4), "stem_width": 32}
    return _create("resnet26_decathlon", pretrained, default, kwargs)


@register_model
def resnet_decathlon_tiny(pretrained: bool = False, **kwargs: Any) -> DecathlonResNet:
    """A CPU-sized member of the family: one block per stage, widths 16/32/64 (8 conv layers)."""
    default = {"widths": (16, 32, 64), "blocks": (1, 1, 1), "stem_width": 16}
    return _create("resnet_decathlon_tiny", pretrained, default, kwargs)
