"""Visual Decathlon preprocessing (Rebuffi et al. 2017; residual_adapters / URL reference code).

Train: resize the shorter side (or both sides) → random crop → optional horizontal flip.
Eval: the same resize → centre crop. Both end as a float tensor [3, crop, crop] in [0, 1],
normalised with the domain's mean and std. The reference setting is ``resize=72, crop=64``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

__all__ = ["DECATHLON_NO_FLIP", "DECATHLON_SQUARE_RESIZE", "build_transform"]

#: Official domains whose classes change under a mirror (characters, digits, signs): no flip.
DECATHLON_NO_FLIP: frozenset[str] = frozenset({"gtsrb", "omniglot", "svhn"})
#: Official domains that the URL reference code resizes to a square instead of the shorter side.
DECATHLON_SQUARE_RESIZE: frozenset[str] = frozenset({"aircraft", "daimlerpedcls"})


def build_transform(
    train: bool,
    resize: int,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    flip: bool = True,
    square_resize: bool = False,
) -> Callable:
    """Build the Decathlon image transform (PIL image or uint8 tensor → normalised tensor).

    Args:
        train: Random crop (+ flip) when True; centre crop when False.
        resize: Target of the shorter side, or of both sides when ``square_resize``.
        crop: Side of the square crop; must not exceed ``resize``.
        mean: Per-channel mean of [0, 1] pixels (length 3).
        std: Per-channel standard deviation of [0, 1] pixels (length 3, positive).
        flip: Random horizontal flip during training (never at evaluation).
        square_resize: Resize to ``resize × resize`` (aspect ratio not kept).

    Returns:
        A callable mapping an RGB image to a float32 tensor of shape [3, crop, crop].
    """
    if crop < 1 or resize < crop:
        raise ValueError(f"need 1 <= crop <= resize, got crop={crop}, resize={resize}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={mean!r}, std={std!r}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std!r}")
    size: int | list[int] = [resize, resize] if square_resize else resize
    steps: list[Callable] = [v2.ToImage(), v2.Resize(size, antialias=True)]
    if train:
        steps.append(v2.RandomCrop(crop))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps.append(v2.CenterCrop(crop))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std]),
    ]
    return v2.Compose(steps)
