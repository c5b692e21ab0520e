"""Reader for the MTAN-preprocessed dense benchmarks (NYUv2, Cityscapes), with MTAN's augmentation.

On-disk layout (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019;
the ``nyuv2`` and ``cityscapes`` folders of the MTAN release; also written by
:func:`write_mtan_fixture`)::

    <root>/<split>/image/<i>.npy     float, H×W×3 (NYUv2 288×384×3), values as stored
    <root>/<split>/label/<i>.npy     H×W class ids, -1 = ignore (Cityscapes: label_7, label_19)
    <root>/<split>/depth/<i>.npy     H×W×1, 0 = invalid (NYUv2 metres, Cityscapes inverse depth)
    <root>/<split>/normal/<i>.npy    H×W×3 unit vectors, all-zero = invalid (NYUv2 only)

with ``i = 0..N-1``. NYUv2 has 795 ``train`` and 654 ``val`` images, and ``val`` *is* the
standard test set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from unirep.data.checks import SkippedFile
from unirep.data.memory import MemoryCache
from unirep.errors import DataError, DataRootError

__all__ = [
    "DENSE_TASKS",
    "DEPTH_KINDS",
    "IGNORE_LABEL",
    "DenseImageTransform",
    "MTANDense",
    "ScaleCrop",
    "apply_scale_crop",
    "hflip",
    "replay_augmentation",
    "resize_image",
    "sample_scale_crop",
    "scale_crop_params",
    "write_mtan_fixture",
]

#: Task names of a sample, in MTAN's order.
DENSE_TASKS: tuple[str, ...] = ("semantic", "depth", "normal")
#: ``"depth"``: metric depth (divided by the zoom factor); ``"inverse_depth"``: multiplied.
DEPTH_KINDS: tuple[str, ...] = ("depth", "inverse_depth")
#: Label of an unlabelled pixel (the semantic loss and mIoU ignore it).
IGNORE_LABEL = -1
#: Array kinds (``dtype.kind``) accepted: real numbers (float, signed or unsigned integers).
_NUMERIC_KINDS = "fiu"
#: Trailing shape of each map after ``H×W``: ``None`` allows ``H×W`` or ``H×W×1``.
_CHANNELS: dict[str, int | None] = {"image": 3, "semantic": None, "depth": None, "normal": 3}


def _layout(root: Path, split: str, label_dir: str) -> str:
    return (
        f"expected {root}/{split}/{{image,{label_dir},depth,normal}}/<i>.npy with i = 0..N-1 "
        "(MTAN preprocessed layout)"
    )


class ScaleCrop(NamedTuple):
    """Window ``[top:top+height, left:left+width]`` of the random scale-crop, zoom ``scale``."""

    scale: float
    top: int
    left: int
    height: int
    width: int


def sample_scale_crop(
    height: int,
    width: int,
    scales: tuple[float, ...] | list[float],
    generator: torch.Generator | None = None,
) -> ScaleCrop:
    """Draw MTAN's random scale-crop window for an ``height × width`` map.

    Picks ``s`` uniformly from ``scales``, then a window of ``(int(H/s), int(W/s))`` at a uniform
    position. Draws from ``generator`` (the global torch RNG when None) in a fixed order: scale
    index, top, left.
    """
    s = float(scales[int(torch.randint(len(scales), (1,), generator=generator))])
    crop_h, crop_w = int(height / s), int(width / s)
    top = int(torch.randint(height - crop_h + 1, (1,), generator=generator))
    left = int(torch.randint(width - crop_w + 1, (1,), generator=generator))
    return ScaleCrop(s, top, left, crop_h, crop_w)


def scale_crop_params(crop: ScaleCrop, flipped: bool) -> dict[str, torch.Tensor]:
    """The ``"aug"`` dict of a dense sample.

    Returns:
        ``{"scale": float32 () zoom factor, "crop": int64 [4] (top, left, height, width) of the
        zoomed window in the original image, "flip": bool ()}``.
    """
    return {
        "scale": torch.tensor(crop.scale, dtype=torch.float32),
        "crop": torch.tensor([crop.top, crop.left, crop.height, crop.width], dtype=torch.int64),
        "flip": torch.tensor(bool(flipped)),
    }


def replay_augmentation(
    sample: dict[str, Any], aug: dict[str, Any], depth_kind: str = "depth"
) -> dict[str, Any]:
    """Apply one sample's recorded ``aug`` (see :func:`scale_crop_params`) to its unaugmented maps.

    Does what :class:`MTANDense` did when it drew ``aug``, without drawing: the scale-crop when
    the scale is not 1, then the flip. ``sample`` holds ``"image"`` ``[3,H,W]`` and any of
    ``"semantic"`` ``[H,W]``, ``"depth"`` ``[1,H,W]``, ``"normal"`` ``[3,H,W]``. Returns a new
    dict.
    """
    top, left, height, width = (int(v) for v in aug["crop"])
    scale = float(aug["scale"])
    if scale != 1.0:
        sample = apply_scale_crop(sample, ScaleCrop(scale, top, left, height, width), depth_kind)
    if bool(aug["flip"]):
        sample = hflip(sample)
    return sample


def apply_scale_crop(
    sample: dict[str, Any], crop: ScaleCrop, depth_kind: str = "depth"
) -> dict[str, Any]:
    """Crop every map of ``sample`` to ``crop`` and resize it back to the full size.

    The image ``[3,H,W]`` is resized bilinearly (``align_corners=True``, as MTAN); semantic
    ``[H,W]``, depth ``[1,H,W]`` and normal ``[3,H,W]`` by nearest neighbour, so invalid pixels
    (-1, 0, all-zero) are never blended with valid ones. Zooming in by ``s`` brings the scene
    ``s`` times closer: metric depth is divided by ``s``, inverse depth multiplied; normals are
    unchanged. Other keys are passed through. Returns a new dict.
    """
    if depth_kind not in DEPTH_KINDS:
        raise ValueError(f"unknown depth_kind {depth_kind!r}; valid: {', '.join(DEPTH_KINDS)}")
    out = dict(sample)
    height, width = sample["image"].shape[-2:]
    rows = slice(crop.top, crop.top + crop.height)
    cols = slice(crop.left, crop.left + crop.width)

    def resize(x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "bilinear":
            return resize_image(x[:, rows, cols], (height, width))
        return F.interpolate(x[None, :, rows, cols], (height, width), mode=mode)[0]

    out["image"] = resize(sample["image"], "bilinear")
    if "semantic" in sample:
        semantic = sample["semantic"][None].to(torch.float64)  # float64 keeps ids exact
        out["semantic"] = resize(semantic, "nearest")[0].to(torch.int64)
    if "depth" in sample:
        depth = resize(sample["depth"], "nearest")
        out["depth"] = depth / crop.scale if depth_kind == "depth" else depth * crop.scale
    if "normal" in sample:
        out["normal"] = resize(sample["normal"], "nearest")
    return out


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An image ``[3, H, W]`` resized bilinearly to ``size`` ``(H', W')`` (``align_corners=True``,
    as MTAN): ``[3, H', W']``."""
    return F.interpolate(image[None], size, mode="bilinear", align_corners=True)[0]


class DenseImageTransform:
    """An image as a dense network takes it at test time, like :class:`MTANDense`'s samples:
    float32 ``[3, H, W]`` with the values as stored (the MTAN releases and the generated scenes
    keep RGB in [0, 1]; no normalisation), resized by :func:`resize_image` to ``size`` when given
    and different (the student's training size, from its manifest's ``image_size``).

    Calling it maps a PIL image or a uint8 tensor ``[3, H, W]`` (scaled to [0, 1]) or a float
    tensor ``[3, H, W]`` (taken as it is) to float32 ``[3, H', W']``.
    """

    def __init__(self, size: Sequence[int] | None = None) -> None:
        self.size = None if size is None else (int(size[0]), int(size[1]))

    def __call__(self, image: Any) -> torch.Tensor:
        x = TF.to_dtype(TF.to_image(image), torch.float32, scale=True).as_subclass(torch.Tensor)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = resize_image(x, self.size)
        return x

    def __repr__(self) -> str:
        return f"DenseImageTransform(size={self.size})"


def hflip(sample: dict[str, Any]) -> dict[str, Any]:
    """Mirror every map of ``sample`` left-right; the normal's x component (channel 0) flips sign.

    Other keys are passed through. Returns a new dict.
    """
    out = dict(sample)
    for key in ("image", "semantic", "depth", "normal"):
        if key in sample:
            out[key] = torch.flip(sample[key], dims=[-1])
    if "normal" in sample:
        # 0 - x rather than -x so that invalid (all-zero) normals do not become -0.0
        out["normal"][0] = 0.0 - out["normal"][0]
    return out


class MTANDense(torch.utils.data.Dataset):
    """One split of an MTAN-preprocessed dense benchmark (NYUv2 or Cityscapes), read lazily.

    Each sample is a dict with ``"image"``: ``[3,H,W]`` float32 (values as stored, not
    normalised), ``"index"``: int, ``"id"``: int (the same file index, stable across epochs and
    processes), ``"aug"``: the augmentation drawn (see :func:`scale_crop_params`; scale 1, the
    full image and no flip without augmentation), and for the requested tasks only
    ``"semantic"``: ``[H,W]`` int64 (-1 = ignore), ``"depth"``: ``[1,H,W]`` float32
    (0 = invalid), ``"normal"``: ``[3,H,W]`` float32 (all-zero = invalid).

    With ``augment=True`` (meant for the training split) each sample gets MTAN's random
    scale-crop (:func:`sample_scale_crop`, :func:`apply_scale_crop`) and then, when ``flip``,
    a horizontal flip with probability 0.5 (:func:`hflip`). Random draws come from
    ``generator``, or the global torch RNG when None; the latter is what a multi-worker
    DataLoader seeds per worker, whereas a generator passed here is copied into every worker
    with the same state.

    Args:
        root: Folder holding ``<split>/`` (e.g. ``nyuv2`` or ``cityscapes``).
        split: Sub-folder, e.g. ``"train"`` or ``"val"``.
        tasks: Subset of :data:`DENSE_TASKS`.
        label_dir: Folder of the semantic labels: ``"label"`` (NYUv2, 13 classes),
            ``"label_7"`` or ``"label_19"`` (Cityscapes).
        depth_kind: ``"depth"`` for metric depth (NYUv2) or ``"inverse_depth"`` (Cityscapes);
            only decides how the scale-crop rescales depth values.
        augment: Apply the random scale-crop and flip.
        scales: Zoom factors the scale-crop draws from (1.0 = no crop).
        flip: Include the random horizontal flip when augmenting.
        generator: Source of the augmentation's randomness.

    Raises:
        ValueError: Unknown task or ``depth_kind``, or an empty ``scales``.
        DataRootError: The root, the split, a task folder or one of the files ``0..N-1`` is
            missing (the message names the path and the expected layout).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        tasks: list[str],
        label_dir: str = "label",
        depth_kind: str = "depth",
        augment: bool = False,
        scales: tuple[float, ...] = (1.0, 1.2, 1.5),
        flip: bool = True,
        generator: torch.Generator | None = None,
        memory: MemoryCache | None = None,
    ) -> None:
        unknown = [t for t in tasks if t not in DENSE_TASKS]
        if unknown:
            raise ValueError(f"unknown dense tasks {unknown}; valid: {', '.join(DENSE_TASKS)}")
        if depth_kind not in DEPTH_KINDS:
            raise ValueError(f"unknown depth_kind {depth_kind!r}; valid: {', '.join(DEPTH_KINDS)}")
        if augment and not scales:
            raise ValueError("scales must list at least one zoom factor")
        if any(s < 1.0 for s in scales):
            raise ValueError(f"scales must be >= 1.0 (the crop is at most the image): {scales}")
        self.root = Path(root)
        self.split = split
        self.tasks = [t for t in DENSE_TASKS if t in tasks]
        self.label_dir = label_dir
        self.depth_kind = depth_kind
        self.augment = augment
        self.scales = tuple(float(s) for s in scales)
        self.flip = flip
        self.generator = generator
        self.memory = memory  # the arrays of a sample, read once (data.memory_cache_mib)

        layout = _layout(self.root, split, label_dir)
        if not self.root.is_dir():
            raise DataRootError(f"data root {self.root} does not exist; {layout}")
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DataRootError(f"split folder {split_dir} does not exist; {layout}")
        folder_of = {"semantic": label_dir, "depth": "depth", "normal": "normal"}
        self._dirs: dict[str, Path] = {"image": split_dir / "image"}
        self._dirs.update({t: split_dir / folder_of[t] for t in self.tasks})
        listings: dict[str, set[str]] = {}
        for key, folder in self._dirs.items():
            if not folder.is_dir():
                raise DataRootError(f"folder {folder} for {key!r} does not exist; {layout}")
            listings[key] = {p.name for p in folder.iterdir() if p.suffix == ".npy"}
        self._length = len(listings["image"])
        if self._length == 0:
            raise DataRootError(f"image folder {self._dirs['image']} has no .npy files; {layout}")
        for key, names in listings.items():
            for i in range(self._length):
                if f"{i}.npy" not in names:
                    raise DataRootError(
                        f"missing file {self._dirs[key] / f'{i}.npy'} ({len(names)} .npy files "
                        f"in the folder, image folder has {self._length}); {layout}"
                    )

    def __len__(self) -> int:
        return self._length

    @property
    def maps(self) -> list[str]:
        """The maps of a sample, as folders are read: ``"image"`` then the tasks."""
        return list(self._dirs)

    def path(self, key: str, index: int) -> Path:
        """File of map ``key`` (``"image"`` or a task) of sample ``index``."""
        return self._dirs[key] / f"{index}.npy"

    def check(
        self, num_classes: int | None = None, skip_unreadable: bool = False
    ) -> dict[int, SkippedFile]:
        """Check every array of the split, vectorised per file (a few seconds for NYUv2).

        Each file is opened with ``np.load(mmap_mode="r")`` and must be a numeric array
        (float or integer) of shape ``H×W×3`` (image, normal) or ``H×W`` / ``H×W×1`` (label,
        depth), with the ``H×W`` of the split's first image (batches stack them); every value
        must be finite; semantic labels, rounded as the reader does, must lie in
        ``[0, num_classes)`` or be :data:`IGNORE_LABEL` (when ``num_classes`` is given).

        Args:
            num_classes: Semantic classes; None skips the label range check.
            skip_unreadable: Return the samples whose files cannot be read as an array at all
                (garbage bytes, truncated, pickled objects) instead of raising; files that read
                but hold the wrong shape, dtype or values are errors either way (they point to a
                wrong dataset or config, not to one damaged file).

        Returns:
            ``{index: {"path", "reason"}}`` of the unreadable samples (empty unless
            ``skip_unreadable``), paths relative to the root.

        Raises:
            DataError: A file is unreadable (unless skipped), or has the wrong shape, dtype or
                values; the message names the file and what is valid.
        """
        bad: dict[int, SkippedFile] = {}
        size: tuple[int, int] | None = None
        for index in range(self._length):
            for key in self._dirs:
                path = self.path(key, index)
                try:
                    array = np.load(path, mmap_mode="r", allow_pickle=False)
                except (ValueError, OSError, EOFError) as err:
                    reason = f"not a readable .npy array ({type(err).__name__}: {err})"
                    if not skip_unreadable:
                        raise DataError(f"{key} file {path} is {reason}") from err
                    bad[index] = {"path": str(path.relative_to(self.root)), "reason": reason}
                    break
                if not isinstance(array, np.ndarray):  # an .npz archive
                    raise DataError(f"{key} file {path} is not a single .npy array")
                if size is None:
                    size = _image_size(array, path) if key == "image" else None
                _check_array(key, array, path, size, num_classes)
        return bad

    def _load(self, key: str, index: int) -> np.ndarray:
        return np.load(self._dirs[key] / f"{index}.npy")

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range [0, {self._length})")
        if self.memory is None:
            sample = self._read(index)
        else:  # a copy of the dict: the cached tensors are never modified
            key = (str(self.root), self.split, index, tuple(self.tasks))
            sample = dict(self.memory.get(key, lambda: self._read(index)))
        height, width = sample["image"].shape[-2:]
        crop, flipped = ScaleCrop(1.0, 0, 0, height, width), False
        if self.augment:
            sample, crop, flipped = self._augment(sample)
        sample["index"] = index
        sample["id"] = index
        sample["aug"] = scale_crop_params(crop, flipped)
        return sample

    def replay_items(self, indices: list[int], augs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The samples ``indices`` with recorded augmentations ``augs`` applied
        (:func:`replay_augmentation`; no RNG use): what ``__getitem__`` gave when it drew them.
        The teacher-output cache reads through it."""
        out = []
        for index, aug in zip(indices, augs, strict=True):
            index = int(index)
            if self.memory is None:
                sample = self._read(index)
            else:
                key = (str(self.root), self.split, index, tuple(self.tasks))
                sample = dict(self.memory.get(key, lambda index=index: self._read(index)))
            sample = replay_augmentation(sample, aug, self.depth_kind)
            out.append({**sample, "index": index, "id": index, "aug": dict(aug)})
        return out

    def _read(self, index: int) -> dict[str, Any]:
        """The sample's arrays as tensors, before augmentation (never modified afterwards)."""
        image = self._load("image", index)
        sample: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), np.float32))
        }
        if "semantic" in self.tasks:
            label = self._load("semantic", index)
            if np.issubdtype(label.dtype, np.floating):
                label = np.rint(label)
            sample["semantic"] = torch.from_numpy(label.astype(np.int64).reshape(label.shape[:2]))
        if "depth" in self.tasks:
            depth = self._load("depth", index).astype(np.float32)
            sample["depth"] = torch.from_numpy(depth.reshape(1, *depth.shape[:2]).copy())
        if "normal" in self.tasks:
            normal = self._load("normal", index)
            sample["normal"] = torch.from_numpy(
                np.ascontiguousarray(normal.transpose(2, 0, 1), np.float32)
            )
        return sample

    def _augment(self, sample: dict[str, Any]) -> tuple[dict[str, Any], ScaleCrop, bool]:
        """MTAN's scale-crop then flip; returns the sample, the window drawn and the flip."""
        height, width = sample["image"].shape[-2:]
        crop = sample_scale_crop(height, width, self.scales, self.generator)
        if crop.scale != 1.0:
            sample = apply_scale_crop(sample, crop, self.depth_kind)
        flipped = self.flip and float(torch.rand((), generator=self.generator)) < 0.5
        if flipped:
            sample = hflip(sample)
        return sample, crop, flipped

    def __repr__(self) -> str:
        return (
            f"MTANDense(root={str(self.root)!r}, split={self.split!r}, tasks={self.tasks}, "
            f"n={self._length}, augment={self.augment})"
        )


def _image_size(image: np.ndarray, path: Path) -> tuple[int, int]:
    if image.ndim != 3:
        raise DataError(f"image file {path} has shape {image.shape}; expected H×W×3")
    return int(image.shape[0]), int(image.shape[1])


def _check_array(
    key: str,
    array: np.ndarray,
    path: Path,
    size: tuple[int, int] | None,
    num_classes: int | None,
) -> None:
    """One map's shape, dtype and values (see :meth:`MTANDense.check`)."""
    channels = _CHANNELS[key]
    expected = "H×W×3" if channels == 3 else "H×W or H×W×1"
    if size is not None:
        expected += f" with H×W = {size[0]}×{size[1]} (the split's first image)"
    shape = array.shape
    ok = array.ndim in (2, 3) and (size is None or shape[:2] == size)
    if channels == 3:
        ok = ok and array.ndim == 3 and shape[2] == 3
    else:
        ok = ok and (array.ndim == 2 or shape[2] == 1)
    if not ok:
        raise DataError(f"{key} file {path} has shape {shape}; expected {expected}")
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise DataError(
            f"{key} file {path} has dtype {array.dtype}; expected a float or integer array"
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        count = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise DataError(f"{key} file {path} holds {count} NaN or infinite values")
    if key == "semantic" and num_classes is not None:
        ids = np.rint(array) if array.dtype.kind == "f" else array
        outside = (ids != IGNORE_LABEL) & ((ids < 0) | (ids >= num_classes))
        if outside.any():
            value = ids[outside].flat[0]
            raise DataError(
                f"semantic file {path} holds class id {int(value)}; valid: 0..{num_classes - 1} "
                f"(dense.num_classes={num_classes}) or {IGNORE_LABEL} (ignore)"
            )


def write_mtan_fixture(
    root: str | Path,
    split: str,
    n: int,
    height: int,
    width: int,
    classes: int,
    with_normals: bool = True,
    label_dir: str = "label",
    seed: int = 0,
) -> Path:
    """Write ``n`` random samples in the MTAN-preprocessed format under ``<root>/<split>/``.

    ``image`` is float32 ``[H,W,3]`` in [0, 1]; ``<label_dir>`` float32 ``[H,W]`` ids in
    ``0..classes-1`` (stored as float, as the MTAN release does) with about 10% set to -1;
    ``depth`` float32 ``[H,W,1]`` in [0.5, 10) with about 10% set to 0; ``normal`` float32
    ``[H,W,3]`` unit vectors with about 10% all-zero. Returns ``<root>/<split>``.
    """
    rng = np.random.default_rng(seed)
    split_dir = Path(root) / split
    folders = ["image", label_dir, "depth"] + (["normal"] if with_normals else [])
    for folder in folders:
        (split_dir / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = rng.random((height, width, 3), dtype=np.float32)
        label = rng.integers(0, classes, (height, width)).astype(np.float32)
        label[rng.random((height, width)) < 0.1] = -1
        depth = rng.uniform(0.5, 10.0, (height, width, 1)).astype(np.float32)
        depth[rng.random((height, width)) < 0.1] = 0
        np.save(split_dir / "image" / f"{i}.npy", image)
        np.save(split_dir / label_dir / f"{i}.npy", label)
        np.save(split_dir / "depth" / f"{i}.npy", depth)
        if with_normals:
            normal = rng.normal(size=(height, width, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            normal[rng.random((height, width)) < 0.1] = 0
            np.save(split_dir / "normal" / f"{i}.npy", normal)
    return split_dir
