"""The splits of a dense multi-task run: train, a validation split, test, in the MTAN format.

:func:`build_dense_data` turns the config into a :class:`DenseData`, which hands out datasets per
split (:class:`~unirep.data.dense.mtan.MTANDense`, augmented for training) and a fingerprint that
ties teachers to the data they saw. Two sources:

- ``mtan``: an existing MTAN-preprocessed folder at ``data.root`` (NYUv2: ``train`` 795 /
  ``val`` 654 images; Cityscapes: ``train`` 2975 / ``val`` 500). MTAN's ``val`` folder is the
  standard **test** set, so the validation split used for model selection is carved from the
  training folder (``dense.val_fraction``, a fixed permutation: the same images for every run
  and every seed) unless ``dense.val_folder`` names a folder of its own.
- ``mini-scenes``: the embedded benchmark (:mod:`unirep.data.dense.mini_scenes`), generated once
  into the cache with ``data.generator`` arguments; it has its own ``train`` / ``val`` / ``test``
  folders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from unirep.config.schema import Config
from unirep.data.checks import SkippedFile, cached_scan, files_fingerprint
from unirep.data.classification.decathlon import ON_CORRUPT_CHOICES
from unirep.data.dense.mini_scenes import SCENE_CLASSES, ensure_mini_scenes
from unirep.data.dense.mtan import DENSE_TASKS, MTANDense
from unirep.data.generated import read_marker
from unirep.data.memory import memory_cache
from unirep.errors import ConfigError, DataError, DataRootError

__all__ = ["DENSE_SOURCES", "DenseData", "build_dense_data", "carve"]

DENSE_SOURCES: tuple[str, ...] = ("mtan", "mini-scenes")
CARVE_SEED = 20190601  # fixed: the carved validation images never depend on the run's seed
FINGERPRINT_SAMPLES = 8  # files per folder whose bytes enter the fingerprint


def carve(num_images: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """(train, validation) file indices, each sorted, of a training folder of ``num_images``
    images whose validation split is carved from it: ``max(1, round(num_images · val_fraction))``
    images, the first of a fixed permutation (:data:`CARVE_SEED`), so the same images for every
    run and seed (NYUv2's 795 at 0.1: 715 / 80; Cityscapes' 2975: 2677 / 298). The train list is
    empty when nothing is left to train on."""
    k = min(num_images, max(1, round(num_images * val_fraction)))
    perm = np.random.default_rng(CARVE_SEED).permutation(num_images)
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


@dataclass
class DenseData:
    """One dense benchmark on disk plus how the run splits and reads it.

    Attributes:
        root: folder holding ``<split>/{image,<label_dir>,depth,normal}/<i>.npy``.
        tasks: the run's tasks, in MTAN order (``semantic``, ``depth``, ``normal``).
        num_classes: semantic classes.
        class_names: names of the semantic classes when known (mini-scenes), else None.
        on_corrupt: ``"skip"`` leaves out (and lists) the samples with an unreadable file once
            :meth:`check` has run; ``"error"`` refuses them.
        cache_dir: Where :meth:`check` keeps its result (``<cache_dir>/checks/``), keyed by the
            files' names, sizes and mtimes, so the arrays are read once per version of the data
            rather than by every process at every start; None: not kept.
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
    on_corrupt: str = "error"
    cache_dir: Path | None = None
    memory_cache_mib: float = 0  # decoded samples kept in memory (data.memory_cache_mib)

    def __post_init__(self) -> None:
        self._memory = memory_cache(self.memory_cache_mib)
        if self.on_corrupt not in ON_CORRUPT_CHOICES:
            raise ValueError(
                f"unknown on_corrupt {self.on_corrupt!r}; valid: {', '.join(ON_CORRUPT_CHOICES)}"
            )
        self._cache: dict[tuple[str, bool], Dataset] = {}
        self._carve: tuple[list[int], list[int]] | None = None
        self._fingerprint: str | None = None
        # per folder: {file index: {"path", "reason"}} of the samples left out (after check())
        self._bad: dict[str, dict[int, SkippedFile]] = {}

    # -- checks ------------------------------------------------------------------------------

    def folders(self) -> dict[str, str]:
        """``{split: folder}``: the folder each of train, val and test reads."""
        val = self.val_folder if self.val_folder is not None else "train"
        return {"train": "train", "val": val, "test": self.test_folder}

    def check(self) -> None:
        """Check every array of every folder the splits read (see :meth:`MTANDense.check`:
        readable, shapes, dtypes, labels in ``[0, num_classes)`` or -1, finite values), and
        that every split keeps at least one sample. The result is cached per version of the
        files (:attr:`cache_dir`); with ``on_corrupt="skip"`` the samples with an unreadable file
        are then left out of every split and listed by :meth:`skipped`.

        Raises:
            DataError: naming the file and what is wrong, or the empty split.
        """
        for folder in dict.fromkeys(self.folders().values()):
            reader = self._read(folder, False)
            paths = [reader.path(k, i) for i in range(len(reader)) for k in reader.maps]
            head = json.dumps([self.tasks, self.label_dir, self.num_classes, self.on_corrupt])
            key = files_fingerprint(paths, self.root, head.encode())
            skip = self.on_corrupt == "skip"

            def scan(reader: MTANDense = reader, skip: bool = skip) -> list[SkippedFile]:
                bad = reader.check(self.num_classes, skip_unreadable=skip)
                return [{**e, "index": str(i)} for i, e in bad.items()]

            found = cached_scan(self.cache_dir, "dense", key, scan)
            self._bad[folder] = {
                int(e["index"]): {"path": str(self.root / e["path"]), "reason": e["reason"]}
                for e in found
            }
        self._cache.clear()  # datasets built before now did not leave the bad samples out
        self._fingerprint = None
        for split, folder in self.folders().items():
            if len(self.dataset(split)) == 0:
                raise DataError(
                    f"split {split!r} ({self.root / folder}) has no readable sample left: "
                    f"{len(self._bad[folder])} skipped, e.g. "
                    f"{next(iter(self._bad[folder].values()))['path']}"
                )

    def skipped(self) -> list[SkippedFile]:
        """Samples left out by :meth:`check` under ``on_corrupt="skip"``: ``{"path", "split",
        "reason"}`` (the sample's first unreadable file), under the split that would read it."""
        out = []
        for split, folder in self.folders().items():
            owned = None
            if split in ("train", "val") and self.val_folder is None:  # carved from train
                owned = set(self.carved()[0 if split == "train" else 1])
            for index, entry in sorted(self._bad.get(folder, {}).items()):
                if owned is None or index in owned:
                    out.append({"path": entry["path"], "split": split, "reason": entry["reason"]})
        return out

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
            memory=self._memory,
        )

    def carved(self) -> tuple[list[int], list[int]]:
        """(train indices, validation indices) of the training folder when val is carved
        (:func:`carve`)."""
        if self._carve is None:
            n = self.folder_images()
            train, val = carve(n, self.val_fraction)
            if not train:
                raise DataRootError(
                    f"{self.root / 'train'} has {n} images: too few to carve a validation split "
                    f"of {self.val_fraction:.0%} and keep training images"
                )
            self._carve = (train, val)
        return self._carve

    def folder_images(self) -> int:
        """Images in the training folder, before validation is carved or bad samples left out
        (what a published split such as MTPSL's has one row per image for)."""
        return len(self._read("train", False))

    def folder_indices(self, split: str) -> list[int]:
        """The file indices in its folder of each image of ``split``, in dataset order."""
        ds = self.dataset(split)
        return [int(i) for i in ds.indices] if isinstance(ds, Subset) else list(range(len(ds)))

    def validation_images(self) -> list[int]:
        """The training folder's images that validate instead of train (empty when validation
        has a folder of its own)."""
        return self.folder_indices("val") if self.val_folder is None else []

    def dataset(self, split: str, train: bool = False) -> Dataset:
        """``split`` in ``train`` / ``val`` / ``test``; ``train=True`` adds MTAN's augmentation.

        Samples are dicts (see :class:`~unirep.data.dense.mtan.MTANDense`): ``image`` ``[3, H, W]``,
        ``semantic`` ``[H, W]``, ``depth`` ``[1, H, W]``, ``normal`` ``[3, H, W]``, ``index``,
        ``id`` (= ``index``: the file index in its folder, so a validation split carved from
        train keeps the training folder's indices) and ``aug`` (scale, crop box, flip drawn).
        """
        key = (split, train)
        if key in self._cache:
            return self._cache[key]
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}; valid: train, val, test")
        folder = self.folders()[split]
        reader = self._read(folder, train and self.augment)
        bad = self._bad.get(folder, {})
        ds: Dataset = reader
        if split != "test" and self.val_folder is None:  # carved from the training folder
            carved = self.carved()[1 if split == "val" else 0]
            ds = Subset(reader, [i for i in carved if i not in bad])
        elif bad:
            ds = Subset(reader, [i for i in range(len(reader)) if i not in bad])
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
        sample = self.dataset("test")[0]
        return {
            "format": "MTAN .npy, image H×W×3 float, not normalised",
            "image_size": list(sample["image"].shape[-2:]),
            "label_dir": self.label_dir,
            "depth_kind": self.depth_kind,
        }


def dense_task_names(cfg: Config) -> list[str]:
    """The run's dense tasks in reading order: by kind as the MTAN files hold them (semantic,
    depth, normal), then as the config lists them."""
    assert cfg.dense is not None
    order = {kind: i for i, kind in enumerate(DENSE_TASKS)}
    tasks = cfg.dense.tasks
    return sorted(tasks, key=lambda t: order.get(tasks[t].kind or t, len(order)))


def dense_kinds(cfg: Config) -> list[str]:
    """The kinds of target the run reads from the files, each once, in reading order."""
    assert cfg.dense is not None
    kinds = [cfg.dense.tasks[t].kind or t for t in dense_task_names(cfg)]
    unknown = [k for k in kinds if k not in DENSE_TASKS]
    if unknown:
        raise ConfigError(
            f"config key 'dense.tasks': this data has no {', '.join(map(repr, unknown))} "
            f"targets; it provides {', '.join(DENSE_TASKS)}"
        )
    return list(dict.fromkeys(kinds))


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
        tasks=dense_kinds(cfg),
        num_classes=dense.num_classes,
        class_names=class_names,
        label_dir=dense.label_dir,
        depth_kind="inverse_depth" if dense.inverse_depth else "depth",
        scales=tuple(dense.scales),
        flip=dense.flip,
        augment=dense.augment,
        val_folder=dense.val_folder,
        memory_cache_mib=cfg.data.memory_cache_mib,
        val_fraction=dense.val_fraction,
        test_folder=dense.test_folder,
        source=cfg.data.source,
        on_corrupt=cfg.data.on_corrupt,
        cache_dir=cache_dir,
    )
    for split in ("train", "val", "test"):  # a missing folder or file fails now, naming it
        data.dataset(split)
    _check_labels(data)
    return data


def _check_labels(data: DenseData) -> None:
    """The first training label map must hold ids in ``[-1, num_classes)``: a mismatch there is
    most likely ``dense.num_classes``, so it is reported as that key (every map, this one
    included, is checked by :meth:`DenseData.check`, which also reports unreadable files)."""
    if "semantic" not in data.tasks:
        return
    train = data.dataset("train")
    index = train.indices[0] if isinstance(train, Subset) else 0
    path = data.root / "train" / data.label_dir / f"{index}.npy"
    try:
        labels = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return  # unreadable: DenseData.check names the file
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "fiu":
        return
    ids = np.rint(labels) if labels.dtype.kind == "f" else np.asarray(labels)
    bad = ids[(ids < -1) | (ids >= data.num_classes)]
    if bad.size:
        raise ConfigError(
            f"config key 'dense.num_classes': {data.num_classes}, but {path} holds class id "
            f"{int(bad.max())} (labels must lie in [0, num_classes) or be -1 for ignore)"
        )
