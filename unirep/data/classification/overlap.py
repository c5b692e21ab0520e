"""Small tasks with partly overlapping label sets, carved from classification domains.

The setting of multi-task learning with partially overlapping label sets (the abstract in
``shared/seeds/abstracts.txt``, line 37: each task has few training samples and a label set
that only partly overlaps the others'): every task is a subset of one domain's classes,
relabelled ``0..k−1`` in the domain's order, with ``samples_per_class`` training images per
class; its validation and test splits are the domain's, restricted to its classes (all of their
images: only training is few-shot). Several tasks over one domain share some classes.

:func:`carve_tasks` maps the domains' labels to the tasks (pure: indices and label maps, no
images); :class:`CarvedSet` is a domain's split seen as one task's (or the auxiliary task's)
dataset. The **union classes** are every ``(domain, class)`` some task holds, numbered in task
order: the label space of the auxiliary task that covers them all.

Drawing: for each ``(domain, class)`` a permutation of its training images is drawn from
``(seed, domain, class)``; the ``j``-th task holding that class (in config order) takes the
``j``-th run of ``samples_per_class`` images of it, wrapping around when the domain has fewer
than the tasks need together. So tasks sharing a class see different images of it while there are
enough, and the auxiliary task pools more images of it than any one task has.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from unirep.config.schema import OverlapConfig
from unirep.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
KEY = "classification.overlap"


@dataclass(frozen=True)
class CarvedTask:
    """One carved task: its domain, the domain's labels it holds (sorted; task label ``i`` is
    domain label ``classes[i]``), the union index of each of its labels and, per split, the
    indices of its images in the domain's split."""

    name: str
    domain: str
    classes: tuple[int, ...]
    union: tuple[int, ...]
    indices: dict[str, tuple[int, ...]]

    def label_map(self) -> dict[int, int]:
        """``{domain label: task label}``."""
        return {c: i for i, c in enumerate(self.classes)}

    def union_map(self) -> dict[int, int]:
        """``{domain label: union label}``."""
        return dict(zip(self.classes, self.union, strict=True))


@dataclass(frozen=True)
class Carving:
    """The tasks of a run (in config order) and the union classes, each ``(domain, label)``."""

    tasks: dict[str, CarvedTask]
    union_classes: tuple[tuple[str, int], ...]
    samples_per_class: int
    seed: int

    def union(self) -> dict[str, list[int]]:
        """``{task: [union label of each task label]}``: the label map to the union classes."""
        return {t: list(c.union) for t, c in self.tasks.items()}

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` records of the carving: per task its domain, classes and images
        per split; the union's size; the classes each pair of tasks shares."""
        names = list(self.tasks)
        shared = {
            a: {b: len(set(self.tasks[a].union) & set(self.tasks[b].union)) for b in names}
            for a in names
        }
        return {
            "samples_per_class": self.samples_per_class,
            "seed": self.seed,
            "union_classes": len(self.union_classes),
            "tasks": {
                t: {
                    "domain": c.domain,
                    "classes": list(c.classes),
                    "union": list(c.union),
                    "images": {s: len(c.indices[s]) for s in SPLITS},
                }
                for t, c in self.tasks.items()
            },
            "shared_classes": shared,
        }


def carve_tasks(
    spec: OverlapConfig, labels: Callable[[str, str], Sequence[int]], num_classes: dict[str, int]
) -> Carving:
    """Carve ``spec.tasks`` from the domains whose ``labels(domain, split)`` (one domain label
    per image, ``-1`` unlabelled) and ``num_classes[domain]`` are given.

    Raises:
        ConfigError: a class index outside its domain, or more ``samples_per_class`` than a
            class has training images (naming the key and what is valid).
        DataError: a task's validation or test split is empty (e.g. an unlabelled test split).
    """
    n = spec.samples_per_class
    union: dict[tuple[str, int], int] = {}
    holders: dict[tuple[str, int], int] = {}  # how many tasks so far took each class
    by_class: dict[tuple[str, str], dict[int, list[int]]] = {}
    tasks = {}
    for name, task in spec.tasks.items():
        domain, k = task.domain, num_classes[task.domain]
        bad = [c for c in task.classes if c >= k]
        if bad:
            raise ConfigError(
                f"config key '{KEY}.tasks.{name}.classes': {bad} not a class of domain "
                f"{domain!r}; valid: 0..{k - 1}"
            )
        classes = tuple(sorted(task.classes))
        for split in SPLITS:
            if (domain, split) not in by_class:
                by_class[domain, split] = _images_by_class(labels(domain, split))
        train = by_class[domain, "train"]
        picked: list[int] = []
        for c in classes:
            pool = train.get(c, [])
            if len(pool) < n:
                fewest = min(len(train.get(x, [])) for x in classes)
                raise ConfigError(
                    f"config key '{KEY}.samples_per_class': {n} exceeds the {len(pool)} training "
                    f"images of class {c} of {domain!r} (task {name!r}); valid: at most {fewest}"
                )
            j = holders.get((domain, c), 0)
            holders[domain, c] = j + 1
            order = _permutation(spec.seed, domain, c, len(pool))
            picked += [pool[order[(j * n + i) % len(pool)]] for i in range(n)]
            union.setdefault((domain, c), len(union))
        indices = {"train": tuple(sorted(picked))}
        for split in ("val", "test"):
            images = sorted(i for c in classes for i in by_class[domain, split].get(c, []))
            if not images:
                raise DataError(
                    f"task {name!r}: split {split!r} of domain {domain!r} has no labelled image of "
                    f"its classes {list(classes)} (an unlabelled split cannot be restricted)"
                )
            indices[split] = tuple(images)
        tasks[name] = CarvedTask(
            name, domain, classes, tuple(union[domain, c] for c in classes), indices
        )
    return Carving(tasks, tuple(union), n, spec.seed)


def _images_by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    """``{label: [index of each image with it]}`` (unlabelled ``-1`` left out)."""
    out: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        if label >= 0:
            out.setdefault(int(label), []).append(i)
    return out


def _permutation(seed: int, domain: str, label: int, size: int) -> list[int]:
    """The fixed order in which the tasks holding ``(domain, label)`` take its images."""
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode()), label])
    return rng.permutation(size).tolist()


class CarvedSet(Dataset):
    """The images ``indices`` of a domain's split (``base``, any classification dataset giving
    ``{"image", "label", "image_id", ...}`` samples), their labels mapped by ``label_map``
    (``{domain label: new label}``: a task's ``0..k−1``, or the union classes).

    ``classes`` lists the domain labels in new-label order (for ``class_names`` and the
    submission's ``category_id``)."""

    def __init__(
        self,
        base: Any,
        indices: Sequence[int],
        label_map: dict[int, int],
        classes: Sequence[int],
    ) -> None:
        self.base = base
        self.indices = list(indices)
        self.label_map = dict(label_map)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> list[int]:
        """The new label of every image, in order."""
        return [self.label_map[int(self.base.labels[i])] for i in self.indices]

    @property
    def image_ids(self) -> list[int]:
        return [int(self.base.image_ids[i]) for i in self.indices]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str] | None:
        names = getattr(self.base, "class_names", None)
        return None if names is None else [names[c] for c in self.classes]

    def category_id(self, label: int) -> int:
        """The domain file's ``category_id`` of a new label."""
        return int(self.base.category_id(self.classes[label]))

    def _relabel(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {**sample, "label": self.label_map[int(sample["label"])]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._relabel(self.base[self.indices[index]])

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch, through the base's batched fetch when it has one (the same samples)."""
        mine = [self.indices[i] for i in indices]
        fetch = getattr(self.base, "__getitems__", None)
        samples = fetch(mine) if fetch is not None else [self.base[i] for i in mine]
        return [self._relabel(s) for s in samples]

    def replay_items(self, indices: list[int], augs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The base's replayed samples (teacher-output cache), relabelled."""
        replay = self.base.replay_items([self.indices[i] for i in indices], augs)
        return [self._relabel(s) for s in replay]

    @property
    def can_replay(self) -> bool:
        return bool(getattr(self.base, "can_replay", False))

    def __repr__(self) -> str:
        return f"CarvedSet({self.base!r}, images={len(self)}, classes={self.classes})"
