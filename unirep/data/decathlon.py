"""Visual Decathlon reader (Rebuffi, Bilen & Vedaldi, NeurIPS 2017), one domain and split at a time.

On-disk layout (``decathlon-1.0/``, also written by :mod:`unirep.data.synthetic`)::

    annotations/<domain>_{train,val}.json       COCO-style: images, annotations, categories
    annotations/<domain>_test.json              labelled test set, when available
    annotations/<domain>_test_stripped.json     devkit test set: images and categories only
    data/<domain>/<split>/NNNNNN.jpg             ``file_name`` in the JSON, relative to the root

Official ids encode the domain (``category_id = d·10⁷ + c``, ``image_id = d·10⁷ + 200000 + k``);
the reader does not rely on it: labels are the position of a ``category_id`` among the file's
sorted category ids, and :meth:`DecathlonDomain.category_id` maps a label back for submissions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from unirep.data.transforms import classification_sample
from unirep.errors import UnirepError

__all__ = [
    "DECATHLON_DOMAINS",
    "ON_CORRUPT_CHOICES",
    "SPLITS",
    "CorruptImageError",
    "DataRootError",
    "DecathlonDomain",
    "coco_annotation",
]

#: The ten official domains in alphabetical order; index + 1 is the d of the id encoding.
DECATHLON_DOMAINS: tuple[str, ...] = (
    "aircraft",
    "cifar100",
    "daimlerpedcls",
    "dtd",
    "gtsrb",
    "imagenet12",
    "omniglot",
    "svhn",
    "ucf101",
    "vgg-flowers",
)
#: Class counts of the official domains (devkit test annotations).
DECATHLON_NUM_CLASSES: dict[str, int] = {
    "aircraft": 100,
    "cifar100": 100,
    "daimlerpedcls": 2,
    "dtd": 47,
    "gtsrb": 43,
    "imagenet12": 1000,
    "omniglot": 1623,
    "svhn": 10,
    "ucf101": 101,
    "vgg-flowers": 102,
}
SPLITS: tuple[str, ...] = ("train", "val", "test")
ON_CORRUPT_CHOICES: tuple[str, ...] = ("error", "skip")


def coco_annotation(image_id: int, category_id: int) -> dict[str, Any]:
    """One entry of a Decathlon ``annotations`` list, with the devkit's fields (id = image id)."""
    return {
        "id": image_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": [],
        "area": 0,
        "bbox": [],
        "iscrowd": 0,
    }


class DataRootError(UnirepError, FileNotFoundError):
    """The data root, an annotation file or a listed image is missing."""


class CorruptImageError(UnirepError, OSError):
    """An image file exists but cannot be decoded."""


def _layout(root: Path, domain: str, split: str) -> str:
    return (
        f"expected {root}/annotations/{domain}_{split}.json and "
        f"{root}/data/{domain}/{split}/NNNNNN.jpg (Visual Decathlon layout)"
    )


def _decode_rgb(path: Path) -> Image.Image:
    """Open and fully decode an image as RGB; decoding failures become CorruptImageError."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() decodes everything, so truncation shows here
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(f"cannot decode image {path}: {err}") from err


class DecathlonDomain(torch.utils.data.Dataset):
    """One Visual Decathlon domain and split, read lazily from disk.

    Each sample is ``{"image": transform(RGB PIL image), "label": int, "image_id": int,
    "id": int, "aug": {"crop": int64 [4], "flip": bool ()}}`` (the PIL image itself when
    ``transform`` is None). ``"id"`` is the image id (stable across epochs and processes);
    ``"aug"`` is the crop box ``(top, left, height, width)`` in the resized image and the flip
    drawn by the transform (see :func:`unirep.data.transforms.apply_transform`). Images are
    sorted by image id and opened only when indexed. Labels are ``-1`` for an unlabelled test
    split.

    Args:
        root: The ``decathlon-1.0`` folder (holding ``annotations/`` and ``data/``).
        domain: Domain name, e.g. ``"aircraft"`` or a synthetic domain's name.
        split: ``"train"``, ``"val"`` or ``"test"``. The test split reads
            ``<domain>_test.json`` when present (labelled) and otherwise the devkit's
            ``<domain>_test_stripped.json`` (labels -1).
        transform: Applied to the RGB PIL image; one with a ``with_params`` method (see
            :func:`~unirep.data.transforms.build_transform`) also reports the crop and flip.
        on_corrupt: ``"error"`` raises :class:`CorruptImageError` naming the file when an image
            cannot be decoded; ``"skip"`` decodes every file once in the constructor (one full
            pass over the split's files, which costs time on large domains), drops the
            undecodable ones and lists their paths in :attr:`skipped`.

    Raises:
        DataRootError: The root, the annotation file, the image folder or a listed image is
            missing (the message names the path and the expected layout).
        ValueError: Unknown split or ``on_corrupt`` value, or a labelled file with an image
            that has no annotation.
    """

    def __init__(
        self,
        root: str | Path,
        domain: str,
        split: str,
        transform: Callable | None = None,
        on_corrupt: str = "error",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid choices: {', '.join(SPLITS)}")
        if on_corrupt not in ON_CORRUPT_CHOICES:
            raise ValueError(
                f"unknown on_corrupt {on_corrupt!r}; valid choices: {', '.join(ON_CORRUPT_CHOICES)}"
            )
        self.root = Path(root)
        self.domain = domain
        self.split = split
        self.transform = transform
        self.on_corrupt = on_corrupt
        if not self.root.is_dir():
            raise DataRootError(
                f"data root {self.root} does not exist; {_layout(self.root, domain, split)}"
            )
        self.annotation_file = self._find_annotation_file()
        expected = "a COCO-style JSON object with 'images' and 'categories'"
        try:
            with open(self.annotation_file, encoding="utf-8") as f:
                content: dict[str, Any] = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"annotation file {self.annotation_file} is not JSON: {err}") from err
        missing = [k for k in ("images", "categories") if k not in content]
        if not isinstance(content, dict) or missing:
            raise ValueError(
                f"annotation file {self.annotation_file} lacks {missing}; expected {expected}"
            )

        categories = sorted(content["categories"], key=lambda c: c["id"])
        self._category_ids: list[int] = [int(c["id"]) for c in categories]
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in categories]
        label_of = {cid: label for label, cid in enumerate(self._category_ids)}

        annotations = content.get("annotations") or []
        self.labelled: bool = bool(annotations)
        category_of_image = {int(a["image_id"]): int(a["category_id"]) for a in annotations}

        images = sorted(content["images"], key=lambda im: im["id"])
        self.image_ids: list[int] = []
        self.labels: list[int] = []
        self._paths: list[Path] = []
        for im in images:
            image_id = int(im["id"])
            if self.labelled:
                if image_id not in category_of_image:
                    raise ValueError(f"{self.annotation_file}: image {image_id} has no annotation")
                label = label_of[category_of_image[image_id]]
            else:
                label = -1
            self.image_ids.append(image_id)
            self.labels.append(label)
            self._paths.append(self.root / im["file_name"])

        if self._paths and not self._paths[0].parent.is_dir():
            raise DataRootError(
                f"image folder {self._paths[0].parent} does not exist (is the domain's archive "
                f"extracted?); {_layout(self.root, domain, split)}"
            )
        self.skipped: list[str] = []
        if on_corrupt == "skip":
            self._drop_undecodable()

    @property
    def num_classes(self) -> int:
        """Number of categories in the annotation file (also for an unlabelled split)."""
        return len(self._category_ids)

    def category_id(self, label: int) -> int:
        """The file's ``category_id`` of a label (e.g. for a Decathlon submission file)."""
        if not 0 <= label < len(self._category_ids):
            raise IndexError(f"label {label} out of range [0, {len(self._category_ids)})")
        return self._category_ids[label]

    def path(self, index: int) -> Path:
        """Path of the image at ``index``."""
        return self._paths[index]

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return classification_sample(
            self.transform,
            self._load(self._paths[index]),
            self.labels[index],
            self.image_ids[index],
        )

    def __repr__(self) -> str:
        return (
            f"DecathlonDomain(root={str(self.root)!r}, domain={self.domain!r}, "
            f"split={self.split!r}, images={len(self)}, classes={self.num_classes}, "
            f"labelled={self.labelled})"
        )

    def _find_annotation_file(self) -> Path:
        folder = self.root / "annotations"
        if self.split != "test":
            path = folder / f"{self.domain}_{self.split}.json"
            if not path.is_file():
                raise DataRootError(
                    f"annotation file {path} not found; "
                    f"{_layout(self.root, self.domain, self.split)}"
                )
            return path
        labelled = folder / f"{self.domain}_test.json"
        stripped = folder / f"{self.domain}_test_stripped.json"
        if labelled.is_file():
            return labelled
        if stripped.is_file():
            return stripped
        raise DataRootError(
            f"annotation file {labelled} (or {stripped.name}) not found; "
            f"{_layout(self.root, self.domain, self.split)}"
        )

    def _load(self, path: Path) -> Image.Image:
        try:
            return _decode_rgb(path)
        except FileNotFoundError as err:
            raise DataRootError(
                f"image {path} listed in {self.annotation_file} not found; "
                f"{_layout(self.root, self.domain, self.split)}"
            ) from err

    def _drop_undecodable(self) -> None:
        keep: list[int] = []
        for i, path in enumerate(self._paths):
            try:
                self._load(path)
            except CorruptImageError:
                self.skipped.append(str(path))
            else:
                keep.append(i)
        self._paths = [self._paths[i] for i in keep]
        self.image_ids = [self.image_ids[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
