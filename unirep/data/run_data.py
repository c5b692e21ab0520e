"""The interface of a run's data: streams, tasks and splits (:class:`RunData`).

Its implementations: the classification domains and dense benchmarks
(:mod:`unirep.data.streams`), tasks carved from domains (:mod:`unirep.data.carved`).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from unirep.tasks import Task


class RunData(abc.ABC):
    """Streams, tasks and splits of one run."""

    root: Path

    @abc.abstractmethod
    def tasks(self) -> dict[str, Task]:
        """The run's tasks, in order."""

    @abc.abstractmethod
    def datasets(self, split: str, train: bool = False) -> dict[str, Dataset]:
        """``{stream: dataset}`` of ``split``; ``train`` turns augmentation on."""

    @abc.abstractmethod
    def batch_sizes(self) -> dict[str, int]:
        """Training batch size per stream and process."""

    @abc.abstractmethod
    def fingerprint(self, task: str) -> str:
        """Identifies the training data (and carved split) a task's teacher saw."""

    @abc.abstractmethod
    def preprocessing(self, stream: str) -> dict[str, Any]:
        """What a user of an exported model must feed it for ``stream``."""

    def streams(self) -> list[str]:
        return list(dict.fromkeys(t.stream for t in self.tasks().values()))

    def labelled_train_set(self, task: str) -> Dataset:
        """The training images labelled for ``task`` (what its single-task teacher sees)."""
        return self.datasets("train", train=True)[self.tasks()[task].stream]

    def save_records(self, run_dir: Path) -> None:  # noqa: B027  (optional hook)
        """Write what the run's data was (e.g. the partial-label split) into the run folder."""

    def label_summary(self) -> dict[str, Any]:
        """Which training labels the run sees (``{}``: every label)."""
        return {}

    @abc.abstractmethod
    def use_preprocessing(self, recorded: dict[str, dict[str, Any]]) -> list[str]:
        """Preprocess each stream of ``recorded`` (an exported model's manifest) as recorded,
        not as the config says; returns one line per stream where the two differed. Call it
        before any dataset is built. What cannot be changed is a :class:`ConfigError`."""

    @abc.abstractmethod
    def prepare(self) -> None:
        """Check the data of every split the run uses (train, val, test) up front, cheaply, and
        compute what the other processes then read (statistics, cached scans).

        Runs before any teacher trains (:func:`unirep.pipeline.stage_two.resolve_data`), in the main
        process first. What is checked depends on the family (see the implementations); any fault is
        a :class:`~unirep.errors.DataError` or
        :class:`~unirep.data.classification.decathlon.DataRootError` naming the file.
        """

    def skipped(self) -> list[dict[str, str]]:
        """Files left out as unreadable under ``data.on_corrupt=skip``, found by :meth:`prepare`:
        ``[{"path", "split", "stream", "reason"}]`` (empty when nothing was skipped)."""
        return []
