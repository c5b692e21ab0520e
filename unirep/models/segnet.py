"""The SegNet encoder of MTAN, and its timm face (``segnet_mtan``, in timm's model registry).

:class:`SegNetEncoder` is the shared encoder of the dense networks (``dense.encoder.name=segnet``,
see :mod:`unirep.models.dense`): Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention" (CVPR 2019), which Universal Representations (Li, Liu & Bilen, IJCV 2023) also uses on
NYUv2. :class:`SegNetBackbone` wraps it with timm's classifier interface and is registered as
``segnet_mtan``, so that the encoder a dense student exported (``student/backbone/``) loads with
``timm.create_model("segnet_mtan", pretrained=True, pretrained_cfg_overlay=dict(file=...))``
after ``import unirep``. Its ``forward_features`` is the encoder's last stage, its ``forward``
the pooled feature (``num_classes=0``) or logits; ``model.encoder(images)`` gives every stage.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from unirep.models.timm_weights import PooledHead, refuse_download

SEGNET_WIDTHS: tuple[int, ...] = (64, 128, 256, 512, 512)
SEGNET_DEPTHS: tuple[int, ...] = (2, 2, 3, 3, 3)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3×3 conv (no bias: BN follows)–BN–ReLU, keeping the spatial size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SegNetEncoder(nn.Module):
    """The SegNet encoder of MTAN (Liu et al. CVPR 2019), as used by URL on NYUv2.

    Five stages of 3×3 conv–BN–ReLU blocks (2, 2, 3, 3, 3 blocks; widths 64, 128, 256, 512, 512
    times ``width_mult``), each followed by a 2×2 max-pool that keeps its indices (for a SegNet
    unpooling decoder). Stage ``i`` outputs the pooled feature ``[B, C_i, ⌊H/2^{i+1}⌋,
    ⌊W/2^{i+1}⌋]``, so the last one is MTAN's/URL's bottleneck ``g_maxpool[4]`` at 1/32.

    Args:
        width_mult: scales every width (``round(c · width_mult)``, at least 1); 1.0 is the
            paper's network, 0.25 a CPU-sized one.
        in_channels: image channels.

    Forward: ``[B, in_channels, H, W]`` with ``H, W ≥ 32`` -> list of 5 ``[B, C_i, H_i, W_i]``.
    """

    def __init__(self, width_mult: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        self.channels: list[int] = [max(1, round(c * width_mult)) for c in SEGNET_WIDTHS]
        self.reductions: list[int] = [2 ** (i + 1) for i in range(len(self.channels))]
        stages = []
        c_in = in_channels
        for width, depth in zip(self.channels, SEGNET_DEPTHS, strict=True):
            blocks = [conv_bn_relu(c_in if b == 0 else width, width) for b in range(depth)]
            stages.append(nn.Sequential(*blocks))
            c_in = width
        self.stages = nn.ModuleList(stages)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True)

    def forward_with_indices(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Pooled stage features and the max-pool indices ``[B, C_i, H_i, W_i]`` of each stage."""
        min_side = self.reductions[-1]
        if images.dim() != 4 or min(images.shape[-2:]) < min_side:
            raise ValueError(
                f"segnet expects [B, C, H, W] with H, W >= {min_side}, got {list(images.shape)}"
            )
        feats: list[Tensor] = []
        indices: list[Tensor] = []
        x = images
        for stage in self.stages:
            x, idx = self.pool(stage(x))
            feats.append(x)
            indices.append(idx)
        return feats, indices

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.forward_with_indices(images)[0]


class SegNetBackbone(PooledHead):
    """:class:`SegNetEncoder` with timm's classifier interface (registered as ``segnet_mtan``).

    Its state dict is the encoder's under ``encoder.`` (plus ``fc.`` when ``num_classes > 0``).
    ``forward_features``: ``[B, 3, H, W]`` → the last stage ``[B, C_5, ⌊H/32⌋, ⌊W/32⌋]``;
    ``forward_head``: global average pool → ``[B, C_5]`` (``pre_logits``) or logits
    ``[B, num_classes]``; ``forward`` = both (pooled features when ``num_classes=0``).
    """

    def __init__(
        self,
        width_mult: float = 1.0,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"segnet_mtan pools by average only, got global_pool={global_pool!r}")
        self.encoder = SegNetEncoder(width_mult, in_chans)
        self.num_features = self.encoder.channels[-1]
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.fc: nn.Module = (
            nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        )

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """timm interface: replace the classifier (0 removes it)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` → ``[B, C_5, ⌊H/32⌋, ⌊W/32⌋]`` (the bottleneck the decoders read)."""
        return self.encoder(x)[-1]


# timm reads the module's ``default_cfgs`` when registering: no hosted weights, so
# ``pretrained=True`` needs a file (a unirep export's ``student/backbone/``).
default_cfgs = generate_default_cfgs(
    {
        "segnet_mtan": {
            "num_classes": 1000,
            "input_size": (3, 288, 384),
            "pool_size": (9, 12),
            "crop_pct": 1.0,
            "mean": (0.0, 0.0, 0.0),
            "std": (1.0, 1.0, 1.0),
            "first_conv": "encoder.stages.0.0.0",
            "classifier": "fc",
            "license": "mit",
        }
    }
)


@register_model
def segnet_mtan(pretrained: bool = False, **kwargs: Any) -> SegNetBackbone:
    """MTAN's SegNet encoder (widths 64–512 × ``width_mult``) as a timm backbone."""
    refuse_download("segnet_mtan", pretrained, kwargs)
    return build_model_with_cfg(SegNetBackbone, "segnet_mtan", pretrained, **kwargs)
