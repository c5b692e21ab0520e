"""A domain read with Hugging Face ``datasets``, so any image-classification dataset can join a run.

``name_or_path`` is read in the first way that applies:

1. a folder written by ``Dataset.save_to_disk`` (it holds ``state.json``) or
   ``DatasetDict.save_to_disk`` (it holds ``dataset_dict.json``): ``datasets.load_from_disk``;
2. another local folder, or a single ``.parquet`` / ``.arrow`` file: ``datasets.load_dataset``,
   which infers the builder from the files (an ``imagefolder`` tree of class sub-folders, parquet,
   arrow, ...) and the splits from file and folder names (``train/``, ``test.parquet``, ...);
3. a Hugging Face Hub dataset name such as ``"uoft-cs/cifar10"`` (downloaded once into
   ``cache_dir``; offline it loads only from that cache).

The rows stay in memory-mapped Arrow files; an image is decoded only when its sample is indexed.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from unirep.data.checks import SkippedFile, cached_scan, files_fingerprint
from unirep.data.classification.decathlon import ON_CORRUPT_CHOICES, SPLITS, to_rgb
from unirep.data.classification.transforms import classification_sample, classification_samples
from unirep.errors import CorruptImageError, DataError, DataRootError

__all__ = ["HFDomain", "global_id_offset"]

#: Ids of one domain lie in a block of this many ids (one block per unirep split inside it).
ID_DOMAIN_STRIDE = 10**9
#: Rows of one split of a domain without an ``id_column``: at most this many.
ID_SPLIT_STRIDE = 10**8
#: Number of domain blocks: offsets stay below 2**53, exact in a float64 and in JSON readers.
ID_DOMAIN_BLOCKS = 2**20


def global_id_offset(domain: str, split: str) -> int:
    """First image id of ``split`` of the Hugging Face domain ``domain`` (ids are offset + row).

    The block is a function of the domain's name alone (sha256), at least 10⁹, so it never meets
    the Visual Decathlon ids (``d·10⁷ + 200000 + k`` < 2·10⁸) nor, but for a 1-in-a-million hash
    collision that :meth:`~unirep.data.streams.RunData.prepare` refuses, another domain's ids;
    ``train``, ``val`` and ``test`` get disjoint sub-blocks, so ids are also unique over splits.
    """
    digest = int.from_bytes(hashlib.sha256(domain.encode()).digest()[:8])
    block = 1 + digest % (ID_DOMAIN_BLOCKS - 1)
    return block * ID_DOMAIN_STRIDE + SPLITS.index(split) * ID_SPLIT_STRIDE


#: Builders for a single data file given as ``name_or_path``, by suffix.
FILE_BUILDERS: dict[str, str] = {".parquet": "parquet", ".arrow": "arrow"}
#: A Hub dataset id: ``name`` or ``namespace/name``.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
#: The split name of a dataset saved without one (``datasets`` names split-less files so too).
DEFAULT_SPLIT = "train"
_TRUE = {"1", "ON", "YES", "TRUE"}
_SOURCES = (
    "expected a folder written by save_to_disk, a folder of data files that "
    "datasets.load_dataset reads (imagefolder, parquet, arrow, ...), a .parquet/.arrow file "
    "or a Hugging Face Hub dataset name"
)


def _hub_offline() -> bool:
    """Offline mode, as ``datasets`` read it at import or as the environment says now."""
    if datasets.config.HF_HUB_OFFLINE:
        return True
    return any(
        os.environ.get(var, "").upper() in _TRUE
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def _looks_like_hub_id(name: str) -> bool:
    return _HUB_ID.fullmatch(name) is not None and not name.startswith(".")


class HFDomain(torch.utils.data.Dataset):
    """One split of a Hugging Face ``datasets`` dataset, as a domain.

    Each sample is ``{"image": transform(RGB PIL image), "label": int, "image_id": int,
    "id": int, "aug": {"crop": int64 [4], "flip": bool ()}}`` (the PIL image itself when
    ``transform`` is None), like :class:`~unirep.data.classification.decathlon.DecathlonDomain`:
    ``"id"`` is the image id (``id_column``, else the row index; stable across epochs and processes)
    and ``"aug"`` the crop box and flip the transform drew.

    Labels: a ``ClassLabel`` column gives the labels and :attr:`class_names` as they are (``-1``
    or null marks an unlabelled row). Any other scalar column is mapped to ``0..K-1`` in the
    sorted order of its distinct values, taken over every split of the dataset so that the
    splits agree, and :attr:`class_names` are those values as strings; nulls, and ``-1`` in an
    integer column, become label ``-1``. :attr:`labelled` is False when every label is ``-1``.

    Args:
        name_or_path: A ``save_to_disk`` folder, a local data folder or file, or a Hub dataset
            name (see the module docstring for the order in which they are tried).
        split: Split name, e.g. ``"train"``. A dataset saved with ``Dataset.save_to_disk``
            without a split name has the single split ``"train"``.
        image_column: Column of ``datasets.Image`` feature holding the images.
        label_column: Column holding one class per row.
        transform: Applied to the RGB PIL image; one with a ``with_params`` method (see
            :func:`~unirep.data.classification.transforms.build_transform`) also reports the crop
            and flip.
        config_name: Configuration of a ``load_dataset`` source (Hub datasets with several).
        cache_dir: Where ``load_dataset`` keeps its Arrow cache (and Hub downloads); the
            ``datasets`` default when None. Unused for ``save_to_disk`` folders, which are read
            in place.
        id_column: Integer column of unique image ids; when None the ids are
            ``id_offset + row index``.
        id_offset: Added to the row index when there is no ``id_column`` (a run passes
            :func:`global_id_offset`, so that ids are unique over every domain of the run).
        on_corrupt: ``"error"`` raises
            :class:`~unirep.data.classification.decathlon.CorruptImageError` naming the row when an
            image cannot be decoded; ``"skip"`` decodes every row once in the constructor, drops the
            undecodable ones and lists them in :attr:`skipped`.
        scan_cache_dir: Where the result of the ``"skip"`` pass is kept
            (``<scan_cache_dir>/checks/``), keyed by :meth:`fingerprint`.
        train_split: The dataset's training split: for a label column of plain values the
            classes are its values, and a value only another split has is refused (a class
            without training images); None: the values of every split.

    The constructor checks the columns, that ids are unique and not null and that labels of a
    ``ClassLabel`` column are within its names; :meth:`check` adds the checks of the images
    (the split is not empty, every row has an image, every image stored as a path exists).

    Raises:
        DataRootError: A local path that does not exist or holds no data, or a Hub dataset that
            cannot be loaded (offline and not cached, unreachable or unknown).
        DataError: Null or duplicate ids, or labels outside the ``ClassLabel`` names (the message
            names the dataset, the split and the id or row).
        ValueError: Unknown split, missing column (the message lists the splits or columns),
            a column of the wrong kind, or ``config_name`` for a ``save_to_disk`` folder.
    """

    def __init__(
        self,
        name_or_path: str,
        split: str,
        image_column: str = "image",
        label_column: str = "label",
        transform: Callable | None = None,
        config_name: str | None = None,
        cache_dir: str | Path | None = None,
        id_column: str | None = None,
        id_offset: int = 0,
        on_corrupt: str = "error",
        scan_cache_dir: str | Path | None = None,
        train_split: str | None = None,
    ) -> None:
        if on_corrupt not in ON_CORRUPT_CHOICES:
            raise ValueError(
                f"unknown on_corrupt {on_corrupt!r}; valid choices: {', '.join(ON_CORRUPT_CHOICES)}"
            )
        self.name_or_path = str(name_or_path)
        self.split = split
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.config_name = config_name
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.id_column = id_column
        self.id_offset = int(id_offset)
        self.on_corrupt = on_corrupt
        self.train_split = train_split

        splits = self._load_splits()
        if split not in splits:
            raise DataError(
                f"unknown split {split!r} for dataset {self.name_or_path!r}; "
                f"available splits: {', '.join(sorted(splits))}"
            )
        # A saved format (e.g. "torch") would change what indexing returns; read plain rows.
        dataset = splits[split].with_format(None)
        for role, column in (
            ("image", image_column),
            ("label", label_column),
            ("id", id_column),
        ):
            if column is not None and column not in dataset.column_names:
                raise ValueError(
                    f"{role} column {column!r} not in split {split!r} of dataset "
                    f"{self.name_or_path!r}; available columns: {', '.join(dataset.column_names)}"
                )

        image_feature = dataset.features[image_column]
        if not isinstance(image_feature, datasets.Image):
            raise ValueError(
                f"image column {image_column!r} of dataset {self.name_or_path!r} has feature "
                f"{image_feature}, expected datasets.Image() (cast it with "
                f"dataset.cast_column({image_column!r}, datasets.Image()))"
            )
        self.class_names, self.labels = self._read_labels(dataset, splits)
        self.labelled: bool = any(label >= 0 for label in self.labels)
        self.image_ids: list[int] = self._read_image_ids(dataset)
        # Only the image column is kept, undecoded: indexing returns its {"bytes", "path"} and
        # the image is decoded in __getitem__, so decoding errors can name the row.
        self.hf_dataset: datasets.Dataset = dataset.select_columns([image_column]).cast_column(
            image_column, datasets.Image(decode=False)
        )
        self._source_fingerprint = str(dataset._fingerprint)
        #: Rows of :attr:`hf_dataset` served, in order (None: every row).
        self._rows: list[int] | None = None
        #: Rows left out by ``on_corrupt="skip"``: ``{"path", "reason"}``.
        self.skipped: list[SkippedFile] = []
        if on_corrupt == "skip":
            self._drop_undecodable(None if scan_cache_dir is None else Path(scan_cache_dir))

    @property
    def num_classes(self) -> int:
        """Number of classes (also for an unlabelled split)."""
        return len(self.class_names)

    def category_id(self, label: int) -> int:
        """A 1-based category id for ``label`` (``label + 1``), e.g. for a submission file.

        Hugging Face datasets have no category ids of their own; numbering from 1 keeps 0 free,
        as COCO-style files do.
        """
        if not 0 <= label < self.num_classes:
            raise IndexError(f"label {label} out of range [0, {self.num_classes})")
        return label + 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        row = index if self._rows is None else self._rows[index]
        return classification_sample(
            self.transform, self._decode(row), self.labels[index], self.image_ids[index]
        )

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A whole batch, its images transformed as one (the same samples as one by one)."""
        if any(not -len(self) <= int(i) < len(self) for i in indices):
            raise IndexError(f"indices {indices} out of range for {len(self)} samples")
        rows = [int(i) % len(self) for i in indices]
        return classification_samples(
            self.transform,
            [self._decode(i if self._rows is None else self._rows[i]) for i in rows],
            [self.labels[i] for i in rows],
            [self.image_ids[i] for i in rows],
        )

    def check(self) -> None:
        """The checks of the images, cheaply (the image column is read through Arrow, nothing is
        decoded): the split is not empty, every row has an image, and every image stored as a
        path (no bytes) exists.

        Raises:
            DataError: The split is empty, or a row has no image (the first one is named).
            DataRootError: An image file is missing (the first one is named, with the count).
        """
        if len(self) == 0:
            raise DataError(
                f"split {self.split!r} of dataset {self.name_or_path!r} is empty"
                + (f" (its {len(self.skipped)} images were all skipped)" if self.skipped else "")
            )
        column = self.hf_dataset.with_format("arrow")[self.image_column]
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        start, missing = 0, []
        for chunk in chunks:  # validity bitmaps only: the image bytes are never materialised
            no_bytes = pc.is_null(chunk.field("bytes"))
            no_image = pc.or_(chunk.is_null(), pc.and_(no_bytes, pc.is_null(chunk.field("path"))))
            if pc.any(no_image).as_py():
                row = start + pc.index(no_image, True).as_py()
                raise DataError(f"{self._where(row)} has no image (null)")
            by_path = pc.indices_nonzero(no_bytes).to_pylist()
            paths = pc.take(chunk.field("path"), by_path).to_pylist() if by_path else []
            missing += [(start + i, p) for i, p in zip(by_path, paths, strict=True)]
            start += len(chunk)
        missing = [(row, path) for row, path in missing if not os.path.isfile(path)]
        if missing:
            row, path = missing[0]
            raise DataRootError(
                f"image file {path} of {self._where(row)} not found ({len(missing)} image "
                f"files of the split missing)"
            )

    def fingerprint(self, indices: list[int] | None = None) -> str:
        """sha256 of the source, split, image column, the dataset's own fingerprint and the name,
        size and mtime of its Arrow files: changes whenever the rows may have changed, wherever
        the files live. ``indices`` is accepted for symmetry with the Decathlon reader; the whole
        split is covered either way (Arrow files are few)."""
        files = [Path(f["filename"]) for f in self.hf_dataset.cache_files]
        root = Path(os.path.commonpath(files)) if files else Path()
        if len(files) == 1:
            root = root.parent
        head = "\0".join([self.split, self.image_column, self._source_fingerprint])
        return files_fingerprint(files, root, head.encode())

    def with_transform(self, transform: Callable | None) -> HFDomain:
        """The same rows and labels (read once) with another transform."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def __repr__(self) -> str:
        return (
            f"HFDomain(name_or_path={self.name_or_path!r}, split={self.split!r}, "
            f"images={len(self)}, classes={self.num_classes}, labelled={self.labelled})"
        )

    def _where(self, index: int) -> str:
        return f"row {index} of split {self.split!r} of dataset {self.name_or_path!r}"

    def _drop_undecodable(self, cache_dir: Path | None) -> None:
        def scan() -> list[SkippedFile]:
            bad = []
            for row in range(len(self.hf_dataset)):
                try:
                    self._decode(row)
                except CorruptImageError as err:
                    reason = str(err.__cause__ or err)
                    bad.append({"path": self._where(row), "reason": reason, "row": str(row)})
            return bad

        bad = cached_scan(cache_dir, "decode-hf", self.fingerprint(), scan)
        dropped = {int(e["row"]) for e in bad}
        self.skipped = [{"path": e["path"], "reason": e["reason"]} for e in bad]
        keep = [i for i in range(len(self.labels)) if i not in dropped]
        self._rows = keep
        self.labels = [self.labels[i] for i in keep]
        self.image_ids = [self.image_ids[i] for i in keep]

    def _decode(self, index: int) -> Image.Image:
        value = self.hf_dataset[index][self.image_column]
        if value is None or (value.get("bytes") is None and value.get("path") is None):
            raise DataRootError(f"{self._where(index)} has no image (null)")
        try:
            image = datasets.Image().decode_example(value)
            return to_rgb(image)  # decodes everything, so truncation shows here
        except FileNotFoundError as err:
            raise DataRootError(
                f"image file {value.get('path')} of {self._where(index)} not found"
            ) from err
        except (OSError, SyntaxError, ValueError) as err:
            raise CorruptImageError(
                f"cannot decode the image of {self._where(index)}: {err}"
            ) from err

    def _load_splits(self) -> dict[str, datasets.Dataset]:
        """Every split of the source, by name (Arrow-backed, nothing decoded)."""
        path = Path(self.name_or_path).expanduser()
        if path.is_dir() and (path / "dataset_dict.json").is_file():
            self._reject_config_name(path)
            return dict(datasets.load_from_disk(str(path)).items())
        if path.is_dir() and (path / "state.json").is_file():
            self._reject_config_name(path)
            dataset = datasets.load_from_disk(str(path))
            return {str(dataset.split or DEFAULT_SPLIT): dataset}
        if path.exists():
            return self._load_local(path)
        if path.is_absolute() or not _looks_like_hub_id(self.name_or_path):
            raise DataRootError(
                f"data path {self.name_or_path!r} ({path.resolve()}) does not exist; {_SOURCES}"
            )
        return self._load_hub()

    def _reject_config_name(self, path: Path) -> None:
        if self.config_name is not None:
            raise ValueError(
                f"config_name={self.config_name!r} given, but {path} was written by "
                f"save_to_disk, which has no configurations"
            )

    def _load_local(self, path: Path) -> dict[str, datasets.Dataset]:
        kwargs: dict[str, Any] = {"name": self.config_name, "cache_dir": self._cache()}
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise ValueError(
                    f"cannot read data file {path}: known suffixes are "
                    f"{', '.join(FILE_BUILDERS)}; {_SOURCES}"
                )
            # A lone file has no split in its name; call it what datasets would.
            kwargs.update(data_files={DEFAULT_SPLIT: str(path)})
            source = builder
        else:
            source = str(path)
        try:
            return dict(datasets.load_dataset(source, **kwargs).items())
        except FileNotFoundError as err:  # e.g. a folder without data files
            raise DataRootError(f"no dataset could be read from {path}: {err}; {_SOURCES}") from err

    def _load_hub(self) -> dict[str, datasets.Dataset]:
        name = self.name_or_path
        cache = self._cache() or "the default datasets cache"
        if _hub_offline() and not datasets.config.HF_HUB_OFFLINE:
            # Offline was switched on after `datasets` was imported, which would still go online.
            raise DataRootError(
                f"{name!r} is not a local path, and Hub dataset {name!r} cannot be downloaded: "
                f"offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); set it before "
                f"importing datasets to load a cached copy from {cache}"
            )
        try:
            loaded = datasets.load_dataset(name, name=self.config_name, cache_dir=self._cache())
        except (ConnectionError, FileNotFoundError) as err:
            if _hub_offline():
                reason = (
                    f"offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) and it is not "
                    f"in {cache}"
                )
            else:
                reason = "it is unknown or the Hub is unreachable"
            raise DataRootError(
                f"{name!r} is not a local path, and Hub dataset {name!r} could not be loaded: "
                f"{reason} ({err})"
            ) from err
        return dict(loaded.items())

    def _cache(self) -> str | None:
        return None if self.cache_dir is None else str(self.cache_dir)

    def _read_labels(
        self, dataset: datasets.Dataset, splits: dict[str, datasets.Dataset]
    ) -> tuple[list[str], list[int]]:
        column = self.label_column
        feature = dataset.features[column]
        values = _column_values(dataset, column)
        if isinstance(feature, datasets.ClassLabel):
            labels = [-1 if v is None or v < 0 else int(v) for v in values]
            beyond = [(row, v) for row, v in enumerate(labels) if v >= feature.num_classes]
            if beyond:
                row, value = beyond[0]
                raise DataError(
                    f"label {value} of {self._where(row)} is outside the ClassLabel column "
                    f"{column!r} (valid: 0..{feature.num_classes - 1}, or -1 for unlabelled)"
                )
            return [str(name) for name in feature.names], labels
        if not isinstance(feature, datasets.Value):
            raise ValueError(
                f"label column {column!r} of dataset {self.name_or_path!r} has feature "
                f"{feature}, expected a ClassLabel or a scalar Value (one class per row)"
            )

        def missing(value: Any) -> bool:
            return value is None or (isinstance(value, int) and value == -1)

        # the classes are the values of the training split (``train_split``); a value that only
        # another split has would be a class no training image teaches. Without it: every split.
        if self.train_split in splits:
            sources = [splits[self.train_split]]
        else:
            sources = [o for o in splits.values() if column in o.column_names]
        classes = {
            v
            for other in sources
            if other.features.get(column) == feature
            for v in _column_values(other, column)
            if not missing(v)
        }
        index_of = {value: label for label, value in enumerate(sorted(classes))}
        unseen = [(row, v) for row, v in enumerate(values) if not missing(v) and v not in index_of]
        if unseen:
            row, value = unseen[0]
            raise DataError(
                f"label {value!r} of {self._where(row)} never occurs in the training split "
                f"({len(unseen)} row(s) of split {self.split!r} have such labels); every class "
                "must have training images: fix the labels or leave those rows out"
            )
        labels = [-1 if missing(v) else index_of[v] for v in values]
        return [str(value) for value in sorted(classes)], labels

    def _read_image_ids(self, dataset: datasets.Dataset) -> list[int]:
        if self.id_column is None:
            if self.id_offset and len(dataset) > ID_SPLIT_STRIDE:
                raise DataError(
                    f"split {self.split!r} of dataset {self.name_or_path!r} has {len(dataset)} "
                    f"rows; without an id_column at most {ID_SPLIT_STRIDE} get unique ids"
                )
            return [self.id_offset + row for row in range(len(dataset))]
        feature = dataset.features[self.id_column]
        if not (isinstance(feature, datasets.Value) and "int" in feature.dtype):
            raise ValueError(
                f"id column {self.id_column!r} of dataset {self.name_or_path!r} has feature "
                f"{feature}, expected integers"
            )
        ids = _column_values(dataset, self.id_column)
        where = f"id column {self.id_column!r} of split {self.split!r} of {self.name_or_path!r}"
        if None in ids:
            raise DataError(f"{where} is null in row {ids.index(None)}; every row needs an id")
        seen: set[int] = set()
        for row, image_id in enumerate(ids):
            if image_id in seen:
                raise DataError(
                    f"{where} has image id {image_id} twice (again in row {row}); ids identify "
                    "images in the submission and must be unique"
                )
            seen.add(image_id)
        return [int(i) for i in ids]


def _column_values(dataset: datasets.Dataset, column: str) -> list[Any]:
    """One column as Python values, read through Arrow (no other column is touched)."""
    return dataset.select_columns([column]).with_format("arrow")[column].to_pylist()
