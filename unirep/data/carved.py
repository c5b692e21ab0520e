"""Run data of tasks carved from classification domains, and the pooled auxiliary task.

:class:`CarvedStreams` is the run's data when ``classification.overlap`` is set: each carved task
(:func:`~unirep.data.classification.overlap.carve_tasks`) is a classification task on its own
stream named after it, reading its domain's images with the domain's preprocessing. Teachers,
the baseline and the student see these tasks as they would see domains.

:class:`PooledStreams` is the auxiliary task of the pruned auxiliary network
(:mod:`unirep.pipeline.overlap`): one classification task over the union of the run's classes,
whose training (validation) split pools every task's training (validation) images with their
union labels.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from unirep.config.schema import Config
from unirep.data.classification.overlap import CarvedSet, Carving, carve_tasks
from unirep.data.run_data import RunData
from unirep.tasks import TASK_KINDS, Task

AUXILIARY = "auxiliary"
"""The auxiliary task's (and stream's) name in its own phase."""


class CarvedStreams(RunData):
    """Carved tasks (``classification.overlap``), each a classification task on its own stream;
    ``streams`` is the :class:`~unirep.data.streams.DomainStreams` of the domains they carve."""

    def __init__(self, streams: Any, cfg: Config) -> None:
        assert cfg.classification is not None and cfg.classification.overlap is not None
        self.streams_of_domains = streams
        self.domains = streams.domains
        self.root = self.domains.root
        self.cfg = cfg
        self.spec = cfg.classification.overlap
        self._carving: Carving | None = None
        self._sets: dict[tuple[str, bool], dict[str, Dataset]] = {}

    def carving(self) -> Carving:
        """The tasks' images and label maps, carved once from the domains' labels."""
        if self._carving is None:
            domains = {t.domain for t in self.spec.tasks.values()}
            self._carving = carve_tasks(
                self.spec,
                lambda d, split: self.domains.raw(d, split).labels,
                {d: self.domains.raw(d, "train").num_classes for d in domains},
            )
        return self._carving

    def union_classes(self) -> dict[str, list[int]]:
        """``{task: [union label of each task label]}`` (the auxiliary task's label map)."""
        return self.carving().union()

    def tasks(self) -> dict[str, Task]:
        assert self.cfg.classification is not None
        spec = self.cfg.classification
        kind = TASK_KINDS.build("classification")
        out = {}
        for name, dataset in self.datasets("train").items():
            out[name] = Task(
                name=name,
                kind=kind,
                stream=name,
                num_classes=dataset.num_classes,  # type: ignore[attr-defined]
                loss=(spec.task_loss.name, dict(spec.task_loss.kwargs)),
                prediction_loss=(spec.prediction_loss.name, dict(spec.prediction_loss.kwargs)),
                class_names=dataset.class_names,  # type: ignore[attr-defined]
            )
        return out

    def datasets(self, split: str, train: bool = False) -> dict[str, Dataset]:
        key = (split, train)
        if key not in self._sets:
            self._sets[key] = {
                name: CarvedSet(
                    self.domains.dataset(task.domain, split, train),
                    task.indices[split],
                    task.label_map(),
                    task.classes,
                )
                for name, task in self.carving().tasks.items()
            }
        return self._sets[key]

    def batch_sizes(self) -> dict[str, int]:
        """Per task: ``classification.batch_sizes.<task>``, else its domain's, else
        ``data.batch_size``."""
        assert self.cfg.classification is not None
        sizes = self.cfg.classification.batch_sizes
        return {
            name: sizes.get(name, self.domains.batch_size(task.domain))
            for name, task in self.carving().tasks.items()
        }

    def fingerprint(self, task: str) -> str:
        """The domain's training data and which of its images (and classes) the task holds."""
        carved = self.carving().tasks[task]
        record = {"classes": carved.classes, "train": carved.indices["train"]}
        digest = hashlib.sha256(self.domains.fingerprint(carved.domain).encode())
        digest.update(json.dumps(record, sort_keys=True).encode())
        return digest.hexdigest()

    def preprocessing(self, stream: str) -> dict[str, Any]:
        return self.domains.preprocessing(self.carving().tasks[stream].domain)

    def use_preprocessing(self, recorded: dict[str, dict[str, Any]]) -> list[str]:
        tasks = self.carving().tasks
        by_domain = {tasks[s].domain: pre for s, pre in recorded.items() if s in tasks}
        self._sets.clear()
        return self.streams_of_domains.use_preprocessing(by_domain)

    def prepare(self) -> None:
        """The domains' checks and statistics (:meth:`DomainStreams.prepare`), then the carving
        (its class indices and sample counts against the data)."""
        self.domains.check()
        for task in self.carving().tasks.values():
            self.domains.mean_std(task.domain)

    def skipped(self) -> list[dict[str, str]]:
        return self.domains.skipped()

    def save_records(self, run_dir: Path) -> None:
        """Nothing to write: the carving is in ``metrics.json`` (:meth:`carving_summary`)."""

    def carving_summary(self) -> dict[str, Any]:
        """The carving's record for ``metrics.json``'s data summary."""
        return self.carving().summary()


def union_classes(data: RunData) -> dict[str, list[int]]:
    """``{task: [union label of each of its labels]}``: the carving's union when the data is
    carved, else the disjoint union of the tasks' classes (in task order)."""
    carved = getattr(data, "union_classes", None)
    if carved is not None:
        return carved()
    out, start = {}, 0
    for name, task in data.tasks().items():
        k = int(task.out_channels)
        out[name] = list(range(start, start + k))
        start += k
    return out


class PooledStreams(RunData):
    """The auxiliary task over the union classes: every task's images of a split, pooled with
    their union labels, on one stream :data:`AUXILIARY` whose batch is the tasks' batches
    together (as many samples per step as a multi-task step).

    The tasks' domains must share one crop size (the pooled batch is one tensor).
    """

    def __init__(self, data: RunData, union: dict[str, list[int]]) -> None:
        self.data = data
        self.root = data.root
        self.union = {t: list(u) for t, u in union.items()}
        self.size = 1 + max(max(u) for u in self.union.values())

    def tasks(self) -> dict[str, Task]:
        kind = TASK_KINDS.build("classification")
        first = next(iter(self.data.tasks().values()))
        return {
            AUXILIARY: Task(
                name=AUXILIARY,
                kind=kind,
                stream=AUXILIARY,
                num_classes=self.size,
                loss=first.loss,
                prediction_loss=first.prediction_loss,
            )
        }

    def datasets(self, split: str, train: bool = False) -> dict[str, Dataset]:
        parts = []
        for t, dataset in self.data.datasets(split, train).items():
            u = self.union[t]  # task label i -> union label u[i]
            every = range(len(dataset))  # type: ignore[arg-type]
            parts.append(CarvedSet(dataset, every, dict(enumerate(u)), range(len(u))))
        return {AUXILIARY: ConcatDataset(parts)}

    def batch_sizes(self) -> dict[str, int]:
        pooled = len(self.datasets("train")[AUXILIARY])
        return {AUXILIARY: min(pooled, sum(self.data.batch_sizes().values()))}

    def fingerprint(self, task: str) -> str:
        text = json.dumps({t: self.data.fingerprint(t) for t in self.union}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def preprocessing(self, stream: str) -> dict[str, Any]:
        return self.data.preprocessing(next(iter(self.data.streams())))

    def use_preprocessing(self, recorded: dict[str, dict[str, Any]]) -> list[str]:
        return self.data.use_preprocessing(recorded)

    def prepare(self) -> None:
        self.data.prepare()
