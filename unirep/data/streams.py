"""The run's data as streams and tasks: what the trainer, evaluator and recipe read.

A run has input **streams** (one per Visual Decathlon domain, or one shared image stream for a
dense benchmark) and **tasks** bound to them (:class:`~unirep.tasks.Task`). :class:`RunData` is the
one interface over both families of sources; :func:`build_run_data` picks the family from the
config (a ``dense`` section reads a dense benchmark).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

import unirep.layout as layout
from unirep.config.load import cache_dir
from unirep.config.schema import Config, PartialConfig
from unirep.data.carved import CarvedStreams
from unirep.data.classification.sources import DomainSet, build_domains
from unirep.data.dense.label_splits import (
    describe,
    import_mtpsl,
    make_label_mask,
    read_label_split,
    split_rows,
    write_label_split,
)
from unirep.data.dense.sources import DenseData, build_dense_data, dense_task_names
from unirep.data.run_data import RunData
from unirep.errors import ConfigError, DataError
from unirep.tasks import TASK_KINDS, Task

#: The single input stream of a dense benchmark (every dense task reads it).
SCENE_STREAM = "images"


class DomainStreams(RunData):
    """Multi-domain classification: each domain is a classification task on its own stream."""

    def __init__(self, domains: DomainSet, cfg: Config) -> None:
        self.domains = domains
        self.root = domains.root
        self.cfg = cfg

    def tasks(self) -> dict[str, Task]:
        kind = TASK_KINDS.build("classification")
        assert self.cfg.classification is not None
        spec = self.cfg.classification.task_loss
        pred = self.cfg.classification.prediction_loss
        out = {}
        for d in self.domains.domains:
            train = self.domains.dataset(d, "train")
            out[d] = Task(
                name=d,
                kind=kind,
                stream=d,
                num_classes=train.num_classes,
                loss=(spec.name, dict(spec.kwargs)),
                prediction_loss=(pred.name, dict(pred.kwargs)),
                class_names=train.class_names,
            )
        return out

    def datasets(self, split: str, train: bool = False) -> dict[str, Dataset]:
        return self.domains.datasets(split, train=train)

    def batch_sizes(self) -> dict[str, int]:
        return {d: self.domains.batch_size(d) for d in self.domains.domains}

    def fingerprint(self, task: str) -> str:
        return self.domains.fingerprint(task)

    def preprocessing(self, stream: str) -> dict[str, Any]:
        return self.domains.preprocessing(stream)

    def use_preprocessing(self, recorded: dict[str, dict[str, Any]]) -> list[str]:
        notes = []
        for stream, pre in recorded.items():
            if stream not in self.domains.domains:
                continue
            missing = {"resize", "crop", "square_resize", "mean", "std"} - set(pre)
            if missing:
                raise ConfigError(
                    f"the student's manifest records no {', '.join(sorted(missing))} for "
                    f"{stream!r}; it cannot be evaluated with its own preprocessing"
                )
            mine = self.domains.preprocessing(stream)
            changed = [k for k in ("resize", "crop", "square_resize", "mean", "std")
                       if mine.get(k) != pre[k]]  # fmt: skip
            if changed:
                notes.append(
                    f"{stream}: the student's recorded preprocessing is used ("
                    + ", ".join(f"{k} {pre[k]} instead of {mine.get(k)}" for k in changed)
                    + ")"
                )
            self.domains.recorded[stream] = dict(pre)
        self.domains.forget_datasets()  # none built with the config's preprocessing is reused
        return notes

    def prepare(self) -> None:
        """Every split of every domain: annotation files consistent (unique image ids, category
        ids among the categories, one annotation per image), non-empty, every image file present
        (``os.stat``, no decoding), image ids unique over the domains; with
        ``data.on_corrupt=skip`` every image decoded once and the undecodable ones left out
        (:meth:`skipped`). Then the per-domain statistics (computed and cached once)."""
        self.domains.check()
        for domain in self.domains.domains:
            self.domains.mean_std(domain)

    def skipped(self) -> list[dict[str, str]]:
        return self.domains.skipped()


class SceneStreams(RunData):
    """A dense benchmark: every task reads the one image stream :data:`SCENE_STREAM`."""

    def __init__(self, data: DenseData, cfg: Config) -> None:
        assert cfg.dense is not None
        self.data = data
        self.root = data.root
        self.cfg = cfg
        self.names = dense_task_names(cfg)  # the tasks' names, in the order the data reads them
        self._mask: torch.Tensor | None = None
        self._source: dict[str, Any] | None = None  # protocol file: the file and its rows

    def tasks(self) -> dict[str, Task]:
        assert self.cfg.dense is not None
        out = {}
        for name in self.names:
            spec = self.cfg.dense.tasks[name]
            kind = TASK_KINDS.build(spec.kind or name)
            pred = spec.prediction_loss
            out[name] = Task(
                name=name,
                kind=kind,
                stream=SCENE_STREAM,
                num_classes=self.data.num_classes if kind.has_classes else None,
                loss=(spec.loss.name, dict(spec.loss.kwargs)),
                prediction_loss=(pred.name, dict(pred.kwargs)) if pred is not None else None,
                weight=spec.weight,
                class_names=self.data.class_names if kind.has_classes else None,
            )
        return out

    def datasets(self, split: str, train: bool = False) -> dict[str, Dataset]:
        dataset = self.data.dataset(split, train=train)
        if split == "train" and self.partial:  # val and test stay fully labelled
            dataset = LabelMasked(dataset, self.label_mask(), self.names)
        return {SCENE_STREAM: dataset}

    def labelled_train_set(self, task: str) -> Dataset:
        train = self.datasets("train", train=True)[SCENE_STREAM]
        if not self.partial:
            return train
        column = self.label_mask()[:, self.names.index(task)]
        return Subset(train, column.nonzero().flatten().tolist())

    def batch_sizes(self) -> dict[str, int]:
        return {SCENE_STREAM: self.cfg.data.batch_size}

    def fingerprint(self, task: str) -> str:
        """The data's fingerprint; with partial labels, also which images ``task`` sees."""
        if not self.partial:
            return self.data.fingerprint()
        column = self.label_mask()[:, self.names.index(task)]
        digest = hashlib.sha256(self.data.fingerprint().encode())
        digest.update(column.numpy().tobytes())
        return digest.hexdigest()

    # -- partial labels -----------------------------------------------------------------------

    @property
    def partial(self) -> bool:
        """Whether training sees only some (image, task) labels (``dense.partial.protocol``)."""
        return self.part.protocol != "full"

    @property
    def part(self) -> PartialConfig:
        """The run's ``dense.partial`` section."""
        assert self.cfg.dense is not None
        return self.cfg.dense.partial

    def label_mask(self) -> torch.Tensor:
        """bool ``[N_train, T]``: which training image is labelled for which task (column order:
        the run's tasks), drawn once from ``dense.partial.seed`` (or read from its ``file``: one
        row per training image, or one per image of the whole training folder, as MTPSL's
        files have, whose validation images' rows are then left out; see
        :func:`~unirep.data.dense.label_splits.split_rows`)."""
        if self._mask is None:
            self._mask = self._make_mask()
        return self._mask

    def _make_mask(self) -> torch.Tensor:
        part, tasks = self.part, self.names
        n = len(self.data.dataset("train"))
        ids = self._train_ids()
        if part.protocol == "file":
            assert part.file is not None
            path = Path(part.file).expanduser()
            folder = self.data.folder_images()
            if path.suffix in (".pth", ".pt"):
                order = part.file_tasks or tasks
                mask = import_mtpsl(path, order)
                rows = split_rows(mask.shape[0], ids, folder, f"MTPSL settings file {str(path)!r}")
                self._source = _source(path, mask.shape[0], n)
                return _columns(mask[rows], order, tasks, path)
            # a split drawn by a protocol that labels every image must label every image
            require = _file_protocol(path) in ("one-label", "random-labels")
            mask = read_label_split(
                path, tasks, n, image_ids=ids, require_label=require,
                folder_indices=ids, folder_images=folder,
            )  # fmt: skip
            self._source = _source(path, _file_rows(path), n)
            return mask
        seed = self.cfg.seed if part.seed is None else part.seed
        fraction: Any = None
        if part.protocol == "fraction":
            fraction = {t: part.fractions.get(t, part.fraction) for t in tasks}
        return make_label_mask(part.protocol, n, tasks, seed, fraction=fraction)

    def _train_ids(self) -> list[int]:
        return self.data.folder_indices("train")

    def save_records(self, run_dir: Path) -> None:
        """``label_split.json`` (our documented format) when training labels are partial, with
        the training folder's size, its images carved out for validation and, for a split read
        from a file, that file and how its rows were mapped; an existing one (a resumed run) is
        checked, never rewritten."""
        if not self.partial:
            return
        path = Path(run_dir) / LABEL_SPLIT
        tasks = self.names
        if path.is_file():
            saved = read_label_split(path, tasks, len(self._train_ids()), self._train_ids())
            if not torch.equal(saved, self.label_mask()):
                raise DataError(f"{path} holds another label split than this run draws")
            return
        part = self.part
        mask = self.label_mask()
        drawn = part.protocol != "file"
        write_label_split(
            path, mask, tasks, self._train_ids(), part.protocol,
            (self.cfg.seed if part.seed is None else part.seed) if drawn else None,
            folder_images=self.data.folder_images(),
            validation_images=self.data.validation_images(),
            source=self._source,
        )  # fmt: skip

    def label_summary(self) -> dict[str, Any]:
        """Counts per task and labels per image of the training split (``{}`` when full)."""
        return describe(self.label_mask(), self.names) if self.partial else {}

    def preprocessing(self, stream: str) -> dict[str, Any]:
        return self.data.preprocessing()

    def use_preprocessing(self, recorded: dict[str, dict[str, Any]]) -> list[str]:
        # dense arrays are read as stored: a different label set, depth encoding or image size
        # is another benchmark, not another preprocessing
        keys = {"image_size": "the data's image size", "label_dir": "dense.label_dir",
                "depth_kind": "dense.inverse_depth"}  # fmt: skip
        for stream, pre in recorded.items():
            if stream not in self.streams():
                continue
            mine = self.preprocessing(stream)
            for key, where in keys.items():
                if key in pre and pre[key] != mine.get(key):
                    raise ConfigError(
                        f"the student was trained with {key} {pre[key]!r} but {where} is "
                        f"{mine.get(key)!r} here; evaluate it on data like its own"
                    )
        return []

    def prepare(self) -> None:
        """Every folder the splits read: each sample's arrays readable, of the right shapes and
        dtypes, labels in range, every value finite (see :meth:`DenseData.check`)."""
        self.data.check()

    def skipped(self) -> list[dict[str, str]]:
        return [{**e, "stream": SCENE_STREAM} for e in self.data.skipped()]


def build_run_data(cfg: Config) -> RunData:
    """The run's data: a dense benchmark when ``cfg.dense`` is set, else classification domains."""
    if cfg.dense is not None:
        return SceneStreams(build_dense_data(cfg, cache_dir(cfg)), cfg)
    assert cfg.classification is not None
    overlap = cfg.classification.overlap
    if overlap is not None:  # tasks carved from the domains they name
        used = list(dict.fromkeys(t.domain for t in overlap.tasks.values()))
        spec = dataclasses.replace(cfg.classification, domains=used)
        domains = DomainStreams(build_domains(cfg.data, spec, cache_dir(cfg)), cfg)
        return CarvedStreams(domains, cfg)
    return DomainStreams(build_domains(cfg.data, cfg.classification, cache_dir(cfg)), cfg)


LABEL_SPLIT = layout.LABEL_SPLIT


class LabelMasked(Dataset):
    """A training split whose samples also carry ``label_mask``: ``{task: bool}`` from row ``i``
    of a bool ``[N, T]`` split (columns in ``tasks`` order); :func:`unirep.batch.make_batch`
    turns it into the batch's per-task masks."""

    def __init__(self, dataset: Dataset, mask: torch.Tensor, tasks: list[str]) -> None:
        if mask.shape != (len(dataset), len(tasks)):  # type: ignore[arg-type]
            raise ValueError(f"mask {tuple(mask.shape)} for {len(dataset)} samples, {tasks}")  # type: ignore[arg-type]
        self.dataset, self.mask, self.tasks = dataset, mask, list(tasks)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._masked(self.dataset[i], i)

    def replay_items(self, indices: list[int], augs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The wrapped dataset's replayed samples (teacher-output cache), with their masks."""
        replay = self.dataset.replay_items  # type: ignore[attr-defined]
        return [self._masked(s, i) for s, i in zip(replay(indices, augs), indices, strict=True)]

    @property
    def can_replay(self) -> bool:
        """Whether the wrapped dataset replays recorded augmentations."""
        return bool(getattr(self.dataset, "can_replay", hasattr(self.dataset, "replay_items")))

    def _masked(self, sample: dict[str, Any], i: int) -> dict[str, Any]:
        sample = dict(sample)
        sample["label_mask"] = dict(zip(self.tasks, self.mask[i].tolist(), strict=True))
        return sample


def _file_protocol(path: Path) -> str | None:
    """The ``protocol`` a unirep split file records (None when absent or unreadable: the reader
    then names the problem)."""
    try:
        value = json.loads(path.read_text()).get("protocol")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _file_rows(path: Path) -> int:
    """The number of label rows of a unirep split file that has just been read."""
    return len(json.loads(path.read_text(encoding="utf-8"))["labels"])


def _source(path: Path, rows: int, num_images: int) -> dict[str, Any]:
    """The ``source`` record of a split read from ``path`` (``rows`` rows) for ``num_images``
    training images: rows indexed by training image when the counts agree, else by folder."""
    return {
        "file": str(path),
        "rows": rows,
        "row_of": "training" if rows == num_images else "folder",
    }


def _columns(mask: torch.Tensor, order: list[str], tasks: list[str], path: Path) -> torch.Tensor:
    """The run's task columns of an MTPSL split whose columns are ``order``."""
    missing = [t for t in tasks if t not in order]
    if missing:
        raise DataError(
            f"{path}: its columns are {order} (partial.file_tasks); no column for {missing}"
        )
    return mask[:, [order.index(t) for t in tasks]]
