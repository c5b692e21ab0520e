"""Visual Decathlon reader (Rebuffi, Bilen & Vedaldi, NeurIPS 2017), one domain and split at a time.

On-disk layout (``decathlon-1.0/``, also written by
:mod:`unirep.data.classification.mini_decathlon`)::

    annotations/<domain>_{train,val}.json       COCO-style: images, annotations, categories
    annotations/<domain>_test.json              labelled test set, when available
    annotations/<domain>_test_stripped.json     devkit test set: images and categories only
    data/<domain>/<split>/NNNNNN.jpg             ``file_name`` in the JSON, relative to the root

Official ids encode the domain (``category_id = d·10⁷ + c``, ``image_id = d·10⁷ + 200000 + k``);
the reader does not rely on it: labels are the position of a ``category_id`` among the file's
sorted category ids, and :meth:`DecathlonDomain.category_id` maps a label back for submissions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from unirep.data.checks import SkippedFile, cached_scan, files_fingerprint
from unirep.data.classification.transforms import (
    batch_samples,
    classification_sample,
    classification_samples,
)
from unirep.data.memory import MemoryCache
from unirep.errors import CorruptImageError, DataError, DataRootError
from unirep.metrics.classification import OFFICIAL_DECATHLON_DOMAINS as DECATHLON_DOMAINS

__all__ = [
    "DECATHLON_DOMAINS",
    "ON_CORRUPT_CHOICES",
    "SPLITS",
    "CorruptImageError",
    "DataRootError",
    "DecathlonDomain",
    "coco_annotation",
]

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


def _layout(root: Path, domain: str, split: str) -> str:
    return (
        f"expected {root}/annotations/{domain}_{split}.json and "
        f"{root}/data/{domain}/{split}/NNNNNN.jpg (Visual Decathlon layout)"
    )


HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
"""PIL modes of 16-bit, 32-bit integer and float single-channel images."""


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, decoding it fully. 16-bit (and 32-bit integer) greyscale is scaled
    by 255/65535, float greyscale in [0, 1] by 255 (PIL's own ``convert("RGB")`` clips such
    values at 255, turning almost every pixel white); every other mode is PIL's conversion."""
    if img.mode not in HIGH_DEPTH_MODES:
        return img.convert("RGB")
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scale = 255.0 if values.size and float(np.nanmax(values)) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    grey = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _decode_rgb(path: Path) -> Image.Image:
    """Open and fully decode an image as RGB; decoding failures become CorruptImageError."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)  # decodes everything, so truncation shows here
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
    drawn by the transform (see :func:`unirep.data.classification.transforms.apply_transform`).
    Images are sorted by image id and opened only when indexed. Labels are ``-1`` for an unlabelled
    test split.

    Args:
        root: The ``decathlon-1.0`` folder (holding ``annotations/`` and ``data/``).
        domain: Domain name, e.g. ``"aircraft"`` or a synthetic domain's name.
        split: ``"train"``, ``"val"`` or ``"test"``. The test split reads
            ``<domain>_test.json`` when present (labelled) and otherwise the devkit's
            ``<domain>_test_stripped.json`` (labels -1).
        transform: Applied to the RGB PIL image; one with a ``with_params`` method (see
            :func:`~unirep.data.classification.transforms.build_transform`) also reports the crop
            and flip.
        on_corrupt: ``"error"`` raises :class:`CorruptImageError` naming the file when an image
            cannot be decoded; ``"skip"`` decodes every file once in the constructor (one full
            pass over the split's files, which costs time on large domains), drops the
            undecodable ones and lists them in :attr:`skipped`.
        scan_cache_dir: Where the result of the ``"skip"`` pass is kept
            (``<scan_cache_dir>/checks/``), keyed by :meth:`fingerprint`, so it is done once per
            version of the files (the main process does it, the others read it).

    The constructor checks the annotation file's consistency (cheap, in memory): image ids are
    unique, each listed image has exactly one annotation in a labelled file, every annotation's
    ``category_id`` is one of the file's categories and its ``image_id`` one of its images.
    :meth:`check` adds the checks that touch the disk (every listed image exists) and that the
    split is not empty.

    Raises:
        DataRootError: The root, the annotation file, the image folder or a listed image is
            missing (the message names the path and the expected layout).
        DataError: The annotation file is not JSON, lacks a key, or is inconsistent (the message
            names the file and the offending id).
        ValueError: Unknown split or ``on_corrupt`` value.
    """

    def __init__(
        self,
        root: str | Path,
        domain: str,
        split: str,
        transform: Callable | None = None,
        on_corrupt: str = "error",
        scan_cache_dir: str | Path | None = None,
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
        self.memory: MemoryCache | None = None  # decoded, resized images (DomainSet sets it)
        self.on_corrupt = on_corrupt
        if not self.root.is_dir():
            raise DataRootError(
                f"data root {self.root} does not exist; {_layout(self.root, domain, split)}"
            )
        self.annotation_file = self._find_annotation_file()
        self._annotation_bytes = self.annotation_file.read_bytes()
        self._parse(self._annotation_bytes)

        if self._paths and not self._paths[0].parent.is_dir():
            raise DataRootError(
                f"image folder {self._paths[0].parent} does not exist (is the domain's archive "
                f"extracted?); {_layout(self.root, domain, split)}"
            )
        #: Files left out by ``on_corrupt="skip"``: ``{"path", "reason"}``.
        self.skipped: list[SkippedFile] = []
        if on_corrupt == "skip":
            self._drop_undecodable(None if scan_cache_dir is None else Path(scan_cache_dir))

    def _parse(self, raw: bytes) -> None:
        """Read images, labels and categories from the annotation file's bytes, checking them."""
        where = self.annotation_file
        expected = "a COCO-style JSON object with 'images' and 'categories'"
        try:
            content: Any = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"annotation file {where} is not JSON: {err}") from err
        if not isinstance(content, dict):
            raise DataError(f"annotation file {where} holds {type(content).__name__}; {expected}")
        missing = [k for k in ("images", "categories") if k not in content]
        if missing:
            raise DataError(f"annotation file {where} lacks {missing}; expected {expected}")
        try:
            categories = sorted(content["categories"], key=lambda c: int(c["id"]))
            self._category_ids: list[int] = [int(c["id"]) for c in categories]
            self.class_names: list[str] = [str(c.get("name", c["id"])) for c in categories]
            annotations = content.get("annotations") or []
            category_of_image: dict[int, int] = {}
            for a in annotations:
                image_id, category_id = int(a["image_id"]), int(a["category_id"])
                if image_id in category_of_image:
                    raise DataError(
                        f"annotation file {where}: image {image_id} has more than one annotation "
                        "(one category per image)"
                    )
                category_of_image[image_id] = category_id
            images = sorted(content["images"], key=lambda im: int(im["id"]))
            ids = [int(im["id"]) for im in images]
            files = [str(im["file_name"]) for im in images]
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if isinstance(err, DataError):
                raise
            raise DataError(
                f"annotation file {where} has a malformed entry ({type(err).__name__}: {err}); "
                "images need 'id' and 'file_name', annotations 'image_id' and 'category_id', "
                "categories 'id'"
            ) from err

        duplicate = _first_duplicate(self._category_ids)
        if duplicate is not None:
            raise DataError(f"annotation file {where}: category id {duplicate} is listed twice")
        duplicate = _first_duplicate(ids)
        if duplicate is not None:
            raise DataError(
                f"annotation file {where}: image id {duplicate} is listed twice in 'images' "
                "(ids identify images in the submission and must be unique)"
            )
        label_of = {cid: label for label, cid in enumerate(self._category_ids)}
        known = set(ids)
        for image_id, category_id in category_of_image.items():
            if category_id not in label_of:
                span = (
                    f"{len(label_of)} ids, {self._category_ids[0]}..{self._category_ids[-1]}"
                    if label_of
                    else "none"
                )
                raise DataError(
                    f"annotation file {where}: image {image_id} has category_id {category_id}, "
                    f"which is not in the file's categories ({span})"
                )
            if image_id not in known:
                raise DataError(
                    f"annotation file {where}: an annotation names image {image_id}, which is "
                    "not in 'images'"
                )
        self.labelled: bool = bool(annotations)
        unannotated = [i for i in ids if i not in category_of_image] if self.labelled else []
        if unannotated:
            raise DataError(
                f"annotation file {where}: image {unannotated[0]} has no annotation "
                f"({len(unannotated)} of {len(ids)} images have none)"
            )
        self.image_ids: list[int] = ids
        self.labels: list[int] = (
            [label_of[category_of_image[i]] for i in ids] if self.labelled else [-1] * len(ids)
        )
        self._paths: list[Path] = [self.root / f for f in files]

    def check(self) -> None:
        """The checks that touch the disk, cheaply: the split lists at least one image and every
        listed image file exists (one ``os.stat`` each; nothing is decoded here).

        Raises:
            DataError: The split is empty.
            DataRootError: A listed image is missing (the first one is named, with the count).
        """
        if not self._paths and not self.skipped:
            raise DataError(
                f"annotation file {self.annotation_file} lists no images: split {self.split!r} of "
                f"domain {self.domain!r} is empty"
            )
        if not self._paths:
            raise DataError(
                f"every image of {self.annotation_file} was skipped as undecodable "
                f"({len(self.skipped)} files, e.g. {self.skipped[0]['path']})"
            )
        missing = [p for p in self._paths if not os.path.isfile(p)]
        if missing:
            raise DataRootError(
                f"image {missing[0]} listed in {self.annotation_file} not found ({len(missing)} "
                f"of {len(self._paths)} listed images missing); "
                f"{_layout(self.root, self.domain, self.split)}"
            )

    def fingerprint(self, indices: list[int] | None = None) -> str:
        """sha256 of the annotation file's bytes and the name, size and mtime of the images at
        ``indices`` (all when None): changes whenever what they hold may have changed, wherever
        the tree lives. Raises ``DataRootError`` when one of those images is missing."""
        paths = self._paths if indices is None else [self._paths[i] for i in indices]
        head = hashlib.sha256(self._annotation_bytes).digest()
        try:
            return files_fingerprint(paths, self.root, head)
        except FileNotFoundError as err:
            raise self._missing(err.filename) from err

    def with_transform(self, transform: Callable | None) -> DecathlonDomain:
        """The same images and labels (read once) with another transform."""
        other = copy.copy(self)
        other.transform = transform
        return other

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
            self.transform, self._image(index), self.labels[index], self.image_ids[index]
        )

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """The samples of a whole batch (the DataLoader's batched fetch): the images are
        transformed as one batch
        (:func:`~unirep.data.classification.transforms.classification_samples`), with the same draws
        and numbers as ``[self[i] for i in indices]``."""
        return classification_samples(
            self.transform,
            [self._image(i) for i in indices],
            [self.labels[i] for i in indices],
            [self.image_ids[i] for i in indices],
            resized=self.memory is not None and hasattr(self.transform, "resized"),
        )

    def replay_items(self, indices: list[int], augs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The samples ``indices`` with recorded augmentations ``augs`` applied as one batch
        (:meth:`~unirep.data.classification.transforms.DecathlonTransform.batch_replay`; no RNG
        use): what ``__getitems__`` gave when it drew them. The teacher-output cache reads through
        it."""
        replay = getattr(self.transform, "batch_replay", None)
        if not callable(replay):
            raise TypeError(f"{self!r}: its transform cannot replay recorded augmentations")
        x = replay([self._image(i) for i in indices], augs,
                   resized=self.memory is not None)  # fmt: skip
        labels = [self.labels[i] for i in indices]
        return batch_samples(x, labels, [self.image_ids[i] for i in indices], augs)

    @property
    def can_replay(self) -> bool:
        """Whether :meth:`replay_items` works (the transform replays recorded parameters)."""
        return callable(getattr(self.transform, "batch_replay", None))

    def _image(self, index: int) -> Any:
        """The decoded image; with a memory cache and a resizing transform, the image already
        resized (uint8 ``[3, H', W']``, kept): the transform's resize then leaves it as it is, so
        the sample is the one decoding would give."""
        path = self._paths[index]
        resized = getattr(self.transform, "resized", None)
        if self.memory is None or resized is None:
            return self._load(path)
        t = self.transform
        key = (str(path), t.resize, t.square_resize)  # type: ignore[union-attr]
        return self.memory.get(key, lambda: resized(self._load(path)))

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
            raise self._missing(path) from err

    def _missing(self, image: object) -> DataRootError:
        """The error for an image the annotation file lists but the tree lacks."""
        return DataRootError(
            f"image {image} listed in {self.annotation_file} not found; "
            f"{_layout(self.root, self.domain, self.split)}"
        )

    def _drop_undecodable(self, cache_dir: Path | None) -> None:
        def scan() -> list[SkippedFile]:
            bad = []
            for path in self._paths:
                try:
                    self._load(path)
                except CorruptImageError as err:
                    reason = str(err.__cause__ or err)
                    bad.append({"path": os.path.relpath(path, self.root), "reason": reason})
            return bad

        key = self.fingerprint()  # also refuses a missing file before the long pass
        bad = cached_scan(cache_dir, "decode", key, scan)
        self.skipped = [{"path": str(self.root / e["path"]), "reason": e["reason"]} for e in bad]
        dropped = {e["path"] for e in self.skipped}
        keep = [i for i, p in enumerate(self._paths) if str(p) not in dropped]
        self._paths = [self._paths[i] for i in keep]
        self.image_ids = [self.image_ids[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]


def _first_duplicate(values: list[int]) -> int | None:
    seen: set[int] = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None
