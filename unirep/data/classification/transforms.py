"""Visual Decathlon preprocessing (Rebuffi et al. 2017; residual_adapters / URL reference code).

Train: resize the shorter side (or both sides) → random crop → optional horizontal flip.
Eval: the same resize → centre crop. Both end as a float tensor [3, crop, crop] in [0, 1],
normalised with the domain's mean and std. The reference setting is ``resize=72, crop=64``.

:class:`DecathlonTransform` also reports the augmentation it drew (:meth:`~DecathlonTransform.
with_params`), so that a sample can carry it (see :func:`apply_transform`):

- ``"crop"``: int64 ``[4]``, ``(top, left, height, width)`` of the crop in the resized image;
- ``"flip"``: bool ``()``, whether the crop was mirrored left-right.

Its random draws are those of torchvision's ``v2.Compose([ToImage, Resize, RandomCrop(crop),
RandomHorizontalFlip(), ToDtype, Normalize])`` (torchvision 0.2x): from the global torch RNG,
``torch.randint(0, H - crop + 1, size=())`` for the top only when ``H > crop``, then the same for
the left only when ``W > crop``, then ``torch.rand(1)`` for the flip (mirrored when ``< 0.5``)
only when flipping is on. Outputs are bit-identical to that pipeline's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "DECATHLON_NO_FLIP",
    "DECATHLON_SQUARE_RESIZE",
    "DecathlonTransform",
    "apply_transform",
    "batch_samples",
    "build_transform",
    "classification_sample",
    "classification_samples",
    "crop_flip_params",
]

#: Official domains whose classes change under a mirror (characters, digits, signs): no flip.
DECATHLON_NO_FLIP: frozenset[str] = frozenset({"gtsrb", "omniglot", "svhn"})
#: Official domains that the URL reference code resizes to a square instead of the shorter side.
DECATHLON_SQUARE_RESIZE: frozenset[str] = frozenset({"aircraft", "daimlerpedcls"})

#: Probability of the random horizontal flip (torchvision's RandomHorizontalFlip default).
FLIP_P = 0.5


def crop_flip_params(top: int, left: int, height: int, width: int, flip: bool) -> dict[str, Any]:
    """The ``"aug"`` dict of a classification sample.

    Returns:
        ``{"crop": int64 [4] (top, left, height, width), "flip": bool ()}``.
    """
    return {
        "crop": torch.tensor([top, left, height, width], dtype=torch.int64),
        "flip": torch.tensor(bool(flip)),
    }


def _size_of(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image or an image tensor ``[..., H, W]``."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    raise TypeError(
        f"cannot tell the size of a {type(image).__name__}; expected a PIL image or a tensor"
    )


class DecathlonTransform:
    """The Decathlon image transform, recording the crop box and flip it draws.

    Calling it maps a PIL image or a uint8 tensor ``[3, H, W]`` to a float32 tensor
    ``[3, crop, crop]``; :meth:`with_params` returns the tensor and the parameters drawn. Build
    it with :func:`build_transform`, which checks the arguments. Picklable (DataLoader workers).

    Attributes:
        train: Random crop (+ flip) when True; centre crop (no flip) when False.
        crop: Side of the square crop.
        flip: Random horizontal flip during training.
    """

    def __init__(
        self,
        train: bool,
        resize: int,
        crop: int,
        mean: Sequence[float],
        std: Sequence[float],
        flip: bool = True,
        square_resize: bool = False,
    ) -> None:
        self.train = train
        self.resize = resize
        self.crop = crop
        self.flip = flip
        self.square_resize = square_resize
        size: int | list[int] = [resize, resize] if square_resize else resize
        self._to_image = v2.ToImage()
        self._resize = v2.Resize(size, antialias=True)
        self._to_float = v2.ToDtype(torch.float32, scale=True)
        self._normalize = v2.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std])

    def resized(self, image: Any) -> torch.Tensor:
        """The image after ``ToImage`` and ``Resize``: uint8 ``[3, H', W']`` (not cropped)."""
        return self._resize(self._to_image(image))

    def _draw_box(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the crop in a ``height × width`` resized image (draws when training)."""
        crop = self.crop
        if height < crop or width < crop:
            raise ValueError(
                f"Required crop size {(crop, crop)} is larger than input image size "
                f"{(height, width)}."
            )
        if not self.train:  # torchvision's centre-crop anchor
            return round((height - crop) / 2.0), round((width - crop) / 2.0)
        # v2.RandomCrop.make_params: one draw per axis, only where the image is larger
        top = int(torch.randint(0, height - crop + 1, size=())) if height > crop else 0
        left = int(torch.randint(0, width - crop + 1, size=())) if width > crop else 0
        return top, left

    def _draw_flip(self) -> bool:
        """Whether to mirror (v2.RandomHorizontalFlip: one ``torch.rand(1)``, kept if < p)."""
        if not (self.train and self.flip):
            return False
        return not bool(torch.rand(1) >= FLIP_P)

    def _finish(self, resized: torch.Tensor, top: int, left: int, flipped: bool) -> torch.Tensor:
        x = TF.crop(resized, top=top, left=left, height=self.crop, width=self.crop)
        if flipped:
            x = TF.horizontal_flip(x)
        return self._normalize(self._to_float(x))

    def with_params(self, image: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Transform ``image`` and report the augmentation drawn.

        Args:
            image: RGB PIL image, or uint8 tensor ``[3, H, W]``.

        Returns:
            ``(tensor, aug)``: float32 ``[3, crop, crop]`` and ``{"crop": int64 [4]
            (top, left, height, width) in the resized image, "flip": bool ()}``. At evaluation
            the box is the centre crop and flip is False.
        """
        resized = self.resized(image)
        height, width = resized.shape[-2:]
        top, left = self._draw_box(int(height), int(width))
        flipped = self._draw_flip()
        out = self._finish(resized, top, left, flipped)
        return out, crop_flip_params(top, left, self.crop, self.crop, flipped)

    def batch_with_params(
        self, images: Sequence[Any], resized: bool = False
    ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """:meth:`with_params` of every image, as one batch: the same draws in the same order
        (image by image: top, left, flip) and the same numbers, bit for bit, but the flip,
        the conversion to float and the normalisation run once on the stacked crops.

        Args:
            images: RGB PIL images or uint8 tensors ``[3, H_i, W_i]`` (sizes may differ).
            resized: the images are already :meth:`resized` (the memory cache keeps them so):
                the resize, which would leave them as they are, is skipped.

        Returns:
            float32 ``[B, 3, crop, crop]`` and each image's ``aug`` record.
        """
        crops, flips, augs = [], [], []
        for image in images:
            ready = image if resized else self.resized(image)
            height, width = ready.shape[-2:]
            top, left = self._draw_box(int(height), int(width))
            flipped = self._draw_flip()
            crops.append(ready[..., top : top + self.crop, left : left + self.crop])
            flips.append(flipped)
            augs.append(crop_flip_params(top, left, self.crop, self.crop, flipped))
        return self._stacked(crops, flips), augs

    def batch_replay(
        self, images: Sequence[Any], augs: Sequence[dict[str, Any]], resized: bool = False
    ) -> torch.Tensor:
        """:meth:`replay` of every image as one batch (no RNG use): float32
        ``[B, 3, crop, crop]``, equal to :meth:`batch_with_params`'s output for the recorded
        ``augs`` (``resized``: as there)."""
        crops, flips = [], []
        for image, aug in zip(images, augs, strict=True):
            top, left, height, width = (int(v) for v in aug["crop"])
            if (height, width) != (self.crop, self.crop):
                raise ValueError(f"recorded crop {height}×{width}, the transform crops {self.crop}")
            ready = image if resized else self.resized(image)
            crops.append(ready[..., top : top + height, left : left + width])
            flips.append(bool(aug["flip"]))
        return self._stacked(crops, flips)

    def _stacked(self, crops: list[torch.Tensor], flips: list[bool]) -> torch.Tensor:
        """The uint8 crops stacked, mirrored where ``flips``, converted and normalised."""
        x = torch.stack(crops)
        mirror = torch.tensor(flips, dtype=torch.bool)
        if bool(mirror.any()):
            x[mirror] = TF.horizontal_flip(x[mirror])
        return self._normalize(self._to_float(x))

    def replay(self, image: Any, aug: dict[str, Any]) -> torch.Tensor:
        """Apply recorded parameters instead of drawing (no RNG use): resize → crop → flip.

        Args:
            image: The untransformed RGB PIL image or uint8 tensor ``[3, H, W]``.
            aug: One sample's ``{"crop": [4], "flip": ()}`` as returned by :meth:`with_params`.

        Returns:
            float32 ``[3, crop, crop]``, equal to the output the parameters were recorded with.
        """
        top, left, height, width = (int(v) for v in aug["crop"])
        if (height, width) != (self.crop, self.crop):
            raise ValueError(f"recorded crop {height}×{width}, this transform crops {self.crop}")
        return self._finish(self.resized(image), top, left, bool(aug["flip"]))

    def __call__(self, image: Any) -> torch.Tensor:
        """Transform ``image`` (PIL or uint8 ``[3, H, W]``) to float32 ``[3, crop, crop]``."""
        return self.with_params(image)[0]

    def __repr__(self) -> str:
        return (
            f"DecathlonTransform(train={self.train}, resize={self.resize}, crop={self.crop}, "
            f"flip={self.flip}, square_resize={self.square_resize}, "
            f"mean={self._normalize.mean}, std={self._normalize.std})"
        )


def apply_transform(transform: Callable | None, image: Any) -> tuple[Any, dict[str, Any]]:
    """Transform a dataset's image and return the ``"aug"`` record of its sample.

    A transform with a ``with_params`` method (:class:`DecathlonTransform`) reports what it drew.
    Without a transform the image is returned as it is, and so is its record: the full image,
    not flipped. Any other callable is applied, and its record is the same identity one (it is
    taken not to crop or flip at random: nothing about its draws can be known).

    Returns:
        ``(image, {"crop": int64 [4] (top, left, height, width), "flip": bool ()})``.
    """
    with_params = getattr(transform, "with_params", None)
    if callable(with_params):
        return with_params(image)
    height, width = _size_of(image)
    aug = crop_flip_params(0, 0, height, width, False)
    return (image if transform is None else transform(image)), aug


def classification_sample(
    transform: Callable | None, image: Any, label: int, image_id: int
) -> dict[str, Any]:
    """One classification sample in the dataset contract: ``"image"`` (transformed), ``"label"``,
    ``"image_id"`` (the annotation's id, used by the submission), ``"id"`` (the same, stable
    across epochs) and ``"aug"`` (see :func:`apply_transform`)."""
    image, aug = apply_transform(transform, image)
    return {"image": image, "label": label, "image_id": image_id, "id": image_id, "aug": aug}


def classification_samples(
    transform: Callable | None,
    images: list[Any],
    labels: list[int],
    image_ids: list[int],
    resized: bool = False,
) -> list[dict[str, Any]]:
    """:func:`classification_sample` of several images; a :class:`DecathlonTransform` transforms
    them as one batch (:meth:`DecathlonTransform.batch_with_params`: the same samples;
    ``resized``: the images are already at its resize, as the memory cache keeps them)."""
    batch = getattr(transform, "batch_with_params", None)
    if not callable(batch) or not images:
        return [classification_sample(transform, *args)
                for args in zip(images, labels, image_ids, strict=True)]  # fmt: skip
    x, augs = batch(images, resized=resized)
    return batch_samples(x, labels, image_ids, augs)


def batch_samples(
    images: torch.Tensor, labels: list[int], image_ids: list[int], augs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The samples of a transformed batch ``images`` ``[B, 3, crop, crop]``, in the contract of
    :func:`classification_sample`."""
    return [
        {"image": images[j], "label": label, "image_id": iid, "id": iid, "aug": aug}
        for j, (label, iid, aug) in enumerate(zip(labels, image_ids, augs, strict=True))
    ]


def build_transform(
    train: bool,
    resize: int,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    flip: bool = True,
    square_resize: bool = False,
) -> DecathlonTransform:
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
        A :class:`DecathlonTransform`: calling it maps an RGB image to a float32 tensor of shape
        ``[3, crop, crop]``; its ``with_params`` also returns the crop box and flip drawn.
    """
    if crop < 1 or resize < crop:
        raise ValueError(f"need 1 <= crop <= resize, got crop={crop}, resize={resize}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={mean!r}, std={std!r}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std!r}")
    return DecathlonTransform(
        train=train,
        resize=resize,
        crop=crop,
        mean=mean,
        std=std,
        flip=flip,
        square_resize=square_resize,
    )
