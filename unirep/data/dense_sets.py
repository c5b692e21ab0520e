"""The splits of a dense multi-task run: train, a validation split, test, in the MTAN format.

:func:`build_dense_data` turns the config into a :class:`DenseData`, which hands out datasets per
split (:class:`~unirep.data.dense.MTANDense`, augmented for training) and a fingerprint that ties
teachers to the data they saw. Two sources:

- ``mtan``: an existing MTAN-preprocessed folder at ``data.root`` (NYUv2: ``train`` 795 /
  ``val`` 654 images; Cityscapes: ``train`` 2975 / ``val`` 500). MTAN's ``val`` folder is the
  standard **test** set, so the validation split used for model selection is carved from the
  training folder (``dense.val_fraction``, a fixed permutation: the same images for every run
  and every seed) unless ``dense.val_folder`` names a folder of its own.
- ``mini-scenes``: the embedded benchmark (:mod:`unirep.data.scenes`), generated once into the
  cache with ``data.generator`` arguments; it has its own ``train`` / ``val`` / ``test`` folders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from unirep.config import Config, ConfigError
from unirep.data.decathlon import DataRootError
from unirep.data.dense import MTANDense
from unirep.data.generated import read_marker
from unirep.data.scenes import SCENE_CLASSES, ensure_mini_scenes

__all__ = ["DENSE_SOURCES", "DenseData", "build_dense_data"]

DENSE_SOURCES: tuple[str, ...] = ("mtan", "mini-scenes")
CARVE_SEED = 20190601  # fixed: the carved validation images never depend on the run's seed
FINGERPRINT_SAMPLES = 8  # files per folder whose bytes enter the fingerprint


@dataclass
class DenseData:
    """One dense benchmark on disk plus how the run splits and reads it.

    Attributes:
        root: folder holding ``<split>/{image,<label_dir>,depth,normal}/<i>.npy``.
        tasks: the run's tasks, in MTAN order (``semantic``, ``depth``, ``normal``).
        num_classes: semantic classes.
        class_names: names of the semantic classes when known (mini-scenes), else None.
    """

    root: Path
    tasks: list[str]
    num_classes: int
    class_names: list[str] | None
    label_dir: str
    depth_kind: str
    scales: tuple[float, ...]
    flip: bool
    augment: bool
    val_folder: str | None
    val_fraction: float
    test_folder: str
    source: str

    def __post_init__(self) -> None:
        self._cache: dict[tuple[str, bool], Dataset] = {}
        self._carve: tuple[list[int], list[int]] | None = None
        self._fingerprint: str | None = None

    # -- splits ------------------------------------------------------------------------------

    def _read(self, folder: str, augment: bool) -> MTANDense:
        return MTANDense(
            self.root,
            folder,
            self.tasks,
            label_dir=self.label_dir,
            depth_kind=self.depth_kind,
            augment=augment,
            scales=self.scales,
            flip=self.flip,
        )

    def carved(self) -> tuple[list[int], list[int]]:
        """(train indices, validation indices) of the training folder when val is carved."""
        if self._carve is None:
            n = len(self._read("train", False))
            k = max(1, round(n * self.val_fraction))
            if k >= n:
                raise DataRootError(
                    f"{self.root / 'train'} has {n} images: too few to carve a validation split "
                    f"of {self.val_fraction:.0%} and keep training images"
                )
            perm = np.random.default_rng(CARVE_SEED).permutation(n)
            self._carve = (sorted(perm[k:].tolist()), sorted(perm[:k].tolist()))
        return self._carve

    def dataset(self, split: str, train: bool = False) -> Dataset:
        """``split`` in ``train`` / ``val`` / ``test``; ``train=True`` adds MTAN's augmentation.

        Samples are dicts (see :class:`~unirep.data.dense.MTANDense`): ``image`` ``[3, H, W]``,
        ``semantic`` ``[H, W]``, ``depth`` ``[1, H, W]``, ``normal`` ``[3, H, W]``, ``index``,
        ``id`` (= ``index``: the file index in its folder, so a validation split carved from
        train keeps the training folder's indices) and ``aug`` (scale, crop box, flip drawn).
        """
        key = (split, train)
        if key in self._cache:
            return self._cache[key]
        augment = train and self.augment
        if split == "test":
            ds: Dataset = self._read(self.test_folder, augment)
        elif self.val_folder is not None:
            ds = self._read("train" if split == "train" else self.val_folder, augment)
        elif split in ("train", "val"):
            indices = self.carved()[0 if split == "train" else 1]
            ds = Subset(self._read("train", augment), indices)
        else:
            raise ValueError(f"unknown split {split!r}; valid: train, val, test")
        self._cache[key] = ds
        return ds

    # -- identity ----------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """sha256 tying a teacher to its training data and validation split.

        Covers the source, tasks and label folder, the training indices, every training file's
        size and the bytes of :data:`FINGERPRINT_SAMPLES` evenly spaced files per folder (hashing
        all of NYUv2 would read 1 GB at every start). Computed once per object: teacher training,
        teacher loading and export all ask for it.
        """
        if self._fingerprint is not None:
            return self._fingerprint
        digest = hashlib.sha256()
        train = self.dataset("train")
        indices = list(train.indices) if isinstance(train, Subset) else list(range(len(train)))
        digest.update(
            json.dumps([self.source, self.tasks, self.label_dir, self.depth_kind, indices]).encode()
        )
        folders = {
            "image": "image",
            "semantic": self.label_dir,
            "depth": "depth",
            "normal": "normal",
        }
        picks = set(np.linspace(0, len(indices) - 1, FINGERPRINT_SAMPLES).round().astype(int))
        for key in ["image", *self.tasks]:
            folder = self.root / "train" / folders[key]
            for j, i in enumerate(indices):
                path = folder / f"{i}.npy"
                digest.update(f"{key}/{i}:{path.stat().st_size}".encode())
                if j in picks:
                    digest.update(path.read_bytes())
        self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def preprocessing(self) -> dict[str, Any]:
        """What a user of the exported student must feed it (stored in manifests)."""
        sample = self._read(self.test_folder, False)[0]
        return {
            "format": "MTAN .npy, image H×W×3 float, not normalised",
            "image_size": list(sample["image"].shape[-2:]),
            "label_dir": self.label_dir,
            "depth_kind": self.depth_kind,
        }


def build_dense_data(cfg: Config, cache_dir: Path) -> DenseData:
    """The dense benchmark of ``cfg`` (generated into ``cache_dir`` for ``mini-scenes``)."""
    dense = cfg.dense
    if dense is None:
        raise ConfigError("this run has no 'dense' section")
    class_names: list[str] | None = None
    if cfg.data.source == "mini-scenes":
        kwargs = {"seed": 0, "height": 48, "width": 64, "scale": 1.0, **cfg.data.generator}
        unknown = set(kwargs) - {"seed", "height", "width", "scale"}
        if unknown:
            raise ConfigError(
                f"config key 'data.generator': unknown mini-scenes argument(s) {sorted(unknown)}; "
                "valid: seed, height, width, scale"
            )
        root = (
            Path(cfg.data.root).expanduser()
            if cfg.data.root
            else cache_dir / "data" / f"mini-scenes-{kwargs['seed']}-{kwargs['height']}x"
            f"{kwargs['width']}-{kwargs['scale']:g}"
        )
        ensure_mini_scenes(root, **kwargs)
        class_names = list(SCENE_CLASSES)
        if dense.num_classes != len(SCENE_CLASSES):
            raise ConfigError(
                f"config key 'dense.num_classes': mini-scenes has {len(SCENE_CLASSES)} classes "
                f"({', '.join(SCENE_CLASSES)}), got {dense.num_classes}"
            )
    elif cfg.data.source == "mtan":
        if not cfg.data.root:
            raise ConfigError(
                "config key 'data.root': data.source=mtan needs the MTAN-preprocessed folder "
                "(e.g. data.root=/data/nyuv2 holding train/ and val/)"
            )
        root = Path(cfg.data.root).expanduser()
        marker = read_marker(root)
        if marker and marker.get("classes"):
            class_names = list(marker["classes"])
    else:
        raise ConfigError(
            f"config key 'data.source': {cfg.data.source!r} is not a dense data source; "
            f"valid: {', '.join(DENSE_SOURCES)}"
        )
    data = DenseData(
        root=root,
        tasks=[t for t in ("semantic", "depth", "normal") if t in dense.tasks],
        num_classes=dense.num_classes,
        class_names=class_names,
        label_dir=dense.label_dir,
        depth_kind=dense.depth_kind,
        scales=tuple(dense.scales),
        flip=dense.flip,
        augment=dense.augment,
        val_folder=dense.val_folder,
        val_fraction=dense.val_fraction,
        test_folder=dense.test_folder,
        source=cfg.data.source,
    )
    for split in ("train", "val", "test"):  # a missing folder or file fails now, naming it
        data.dataset(split)
    _check_labels(data)
    return data


def _check_labels(data: DenseData) -> None:
    """The first training label map must hold ids in ``[-1, num_classes)``."""
    if "semantic" not in data.tasks:
        return
    sample = data.dataset("train")[0]
    labels = sample["semantic"]
    bad = labels[(labels < -1) | (labels >= data.num_classes)]
    if bad.numel():
        raise ConfigError(
            f"config key 'dense.num_classes': {data.num_classes}, but "
            f"{data.root / 'train' / data.label_dir} holds class id {int(bad.max())} "
            "(labels must lie in [0, num_classes) or be -1 for ignore)"
        )
