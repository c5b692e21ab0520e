"""Tasks as data: one registry entry per kind of task, one :class:`Task` per task of a run.

A Visual Decathlon domain is a ``classification`` task bound to its own input stream; the tasks
of a dense benchmark (``semantic``, ``depth``, ``normal``) are bound to one shared image stream.
Everything that differs between kinds lives here and nowhere else: output channels, the sample
key of the target, the default supervised and prediction-distillation losses, the whole-split
metric meter and its main metric, how raw outputs become predictions, whether outputs are unit
vectors, how a prediction map is drawn in the report. The trainer, evaluator, report and
benchmark only ever talk to :class:`Task`.

A new kind is one new :class:`TaskKind` subclass registered in :data:`TASK_KINDS` (plus its
tests); nothing else in the library names a kind.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from unirep.metrics.classification import METRIC_HIGHER_IS_BETTER, AccuracyMeter
from unirep.metrics.dense import DepthMeter, NormalMeter, SegmentationMeter
from unirep.registry import Registry

TASK_KINDS: Registry[TaskKind] = Registry("task kind")


class Meter(abc.ABC):
    """A whole-split metric accumulator: ``update`` per (gathered) batch, ``compute`` once."""

    @abc.abstractmethod
    def update(self, pred: Tensor, target: Tensor) -> None: ...

    @abc.abstractmethod
    def compute(self) -> dict[str, float | None]:
        """``{metric: value}``; None for every metric when nothing was measured."""


class _Wrapped(Meter):
    """One of :mod:`unirep.metrics.classification` / :mod:`unirep.metrics.dense`' meters behind
    :class:`Meter`."""

    def __init__(self, meter: Any, names: list[str]) -> None:
        self.meter, self.names = meter, names

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.meter.update(pred, target)

    def compute(self) -> dict[str, float | None]:
        if not self.meter.count:
            return dict.fromkeys(self.names)
        try:
            value = self.meter.compute()
        except ValueError:  # nothing valid in the split (no labelled pixel)
            return dict.fromkeys(self.names)
        if isinstance(value, dict):
            return {k: float(v) for k, v in value.items()}
        return {self.names[0]: float(value)}


class TaskKind(abc.ABC):
    """What every task of one kind shares. Subclasses set the class attributes."""

    name: str
    target_key: str  # the key of the target in a dataset sample
    metric_names: list[str]  # what the meter returns, in reporting order
    main_metric: str  # the metric that enters Δm and selection
    default_loss: str  # TASK_LOSSES name
    default_prediction_loss: str | None  # PREDICTION_LOSSES name (None: no default)
    unit_vector: bool = False  # outputs are L2-normalised along channels
    spatial: bool = False  # one prediction per pixel (drawn as a map in the report)
    has_classes: bool = False  # predicts one of the benchmark's classes

    @property
    def higher_is_better(self) -> bool:
        return METRIC_HIGHER_IS_BETTER[self.main_metric]

    @abc.abstractmethod
    def out_channels(self, num_classes: int | None) -> int:
        """Channels of the network's raw output for this kind."""

    @abc.abstractmethod
    def meter(self, num_classes: int | None) -> Meter:
        """A fresh whole-split meter."""

    def predictions(self, raw: Tensor) -> Tensor:
        """Raw network output → what the meter and the report take (identity by default)."""
        return raw

    def render(self, pred: Any, target: Any, num_classes: int | None) -> Any:
        """One sample's prediction as an ``[H, W, 3]`` RGB array in [0, 1] (spatial kinds)."""
        raise TypeError(f"{self.name} predictions are not drawn as maps")


@TASK_KINDS.register("classification")
class Classification(TaskKind):
    """Image classification: logits ``[B, K]``, labels ``[B]`` (−1: unlabelled), top-1 accuracy."""

    name = "classification"
    target_key = "label"
    metric_names: ClassVar[list[str]] = ["accuracy"]
    main_metric = "accuracy"
    default_loss = "cross_entropy"
    default_prediction_loss = "kl"
    has_classes = True

    def out_channels(self, num_classes: int | None) -> int:
        assert num_classes is not None
        return num_classes

    def meter(self, num_classes: int | None) -> Meter:
        return _Wrapped(AccuracyMeter(), self.metric_names)

    def predictions(self, raw: Tensor) -> Tensor:
        return raw.argmax(1)


@TASK_KINDS.register("semantic")
class SemanticSegmentation(TaskKind):
    """Semantic segmentation: logits ``[B, K, H, W]``, labels ``[B, H, W]`` (−1 ignored); mIoU
    from one confusion matrix over the split."""

    name = "semantic"
    target_key = "semantic"
    metric_names: ClassVar[list[str]] = list(SegmentationMeter.metric_names)
    main_metric = "miou"
    default_loss = "cross_entropy"
    default_prediction_loss = "kl"
    spatial = True
    has_classes = True

    def out_channels(self, num_classes: int | None) -> int:
        assert num_classes is not None
        return num_classes

    def meter(self, num_classes: int | None) -> Meter:
        assert num_classes is not None
        return _Wrapped(SegmentationMeter(num_classes, ignore_index=-1), self.metric_names)

    def predictions(self, raw: Tensor) -> Tensor:
        return raw.argmax(1)

    def render(self, pred: Any, target: Any, num_classes: int | None) -> Any:
        import numpy as np
        from matplotlib import colormaps

        k = max(int(num_classes or 1), 1)
        ids = np.asarray(pred).round().astype(int)
        palette = colormaps["tab20"](np.arange(k) % 20)[:, :3]
        rgb = palette[np.clip(ids, 0, k - 1)]
        rgb[(ids < 0) | (ids >= k)] = 0.0
        return rgb


@TASK_KINDS.register("depth")
class Depth(TaskKind):
    """Depth regression: ``[B, 1, H, W]`` (0 = invalid); pixel-accumulated abs / rel errors."""

    name = "depth"
    target_key = "depth"
    metric_names: ClassVar[list[str]] = list(DepthMeter.metric_names)
    main_metric = "abs_err"
    default_loss = "depth_l1"
    default_prediction_loss = "dense_l1"
    spatial = True

    def out_channels(self, num_classes: int | None) -> int:
        return 1

    def meter(self, num_classes: int | None) -> Meter:
        return _Wrapped(DepthMeter(), self.metric_names)

    def render(self, pred: Any, target: Any, num_classes: int | None) -> Any:
        """Viridis, scaled by the ground truth's valid range (the prediction's own without it)."""
        import numpy as np
        from matplotlib import colormaps

        d = np.asarray(pred)[0]
        ref = d if target is None else np.asarray(target)[0]
        valid = ref[ref > 0]
        lo, hi = (float(valid.min()), float(valid.max())) if valid.size else (0.0, 1.0)
        rgb = colormaps["viridis"](np.clip((d - lo) / max(hi - lo, 1e-6), 0, 1))[..., :3]
        rgb[d <= 0] = 0.0
        return rgb


@TASK_KINDS.register("normal")
class SurfaceNormal(TaskKind):
    """Surface normals: unit vectors ``[B, 3, H, W]`` (all-zero = invalid); angle errors."""

    name = "normal"
    target_key = "normal"
    metric_names: ClassVar[list[str]] = list(NormalMeter.metric_names)
    main_metric = "angle_mean"
    default_loss = "normal_cosine"
    default_prediction_loss = "dense_l1"
    unit_vector = True
    spatial = True

    def out_channels(self, num_classes: int | None) -> int:
        return 3

    def meter(self, num_classes: int | None) -> Meter:
        return _Wrapped(NormalMeter(), self.metric_names)

    def render(self, pred: Any, target: Any, num_classes: int | None) -> Any:
        """``(n + 1) / 2`` as RGB; all-zero (invalid) is black."""
        import numpy as np

        n = np.asarray(pred).transpose(1, 2, 0)
        rgb = np.clip((n + 1.0) / 2.0, 0, 1)
        rgb[~np.any(n != 0, axis=-1)] = 0.0
        return rgb


def as_kind(kind: TaskKind | str) -> TaskKind:
    """A task kind, given as itself or by its registry name (``"semantic"``)."""
    return TASK_KINDS.build(kind) if isinstance(kind, str) else kind


@dataclass
class Task:
    """One task of a run: a kind bound to an input stream, with its losses and weight.

    Attributes:
        name: the task's name, used as the key of every per-task collection (heads, teachers,
            losses, metrics).
        kind: its :class:`TaskKind`.
        stream: the input stream it reads (a Decathlon domain's own images, or the shared images
            of a dense benchmark).
        num_classes: classes (classification, segmentation); None for regression kinds.
        loss: ``(name, kwargs)`` of its supervised loss (``TASK_LOSSES``).
        prediction_loss: ``(name, kwargs)`` of its prediction distillation
            (``PREDICTION_LOSSES``); None: none.
        weight: multiplies the supervised loss.
        class_names: for reports and manifests.
    """

    name: str
    kind: TaskKind
    stream: str
    num_classes: int | None = None
    loss: tuple[str, dict[str, Any]] | None = None
    prediction_loss: tuple[str, dict[str, Any]] | None = None
    weight: float = 1.0
    class_names: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.loss is None:
            self.loss = (self.kind.default_loss, {})

    @property
    def out_channels(self) -> int:
        return self.kind.out_channels(self.num_classes)

    @property
    def target_key(self) -> str:
        return self.kind.target_key

    @property
    def main_metric(self) -> str:
        return self.kind.main_metric

    @property
    def higher_is_better(self) -> bool:
        return self.kind.higher_is_better

    @property
    def metric_names(self) -> list[str]:
        return list(self.kind.metric_names)

    def meter(self) -> Meter:
        return self.kind.meter(self.num_classes)

    def predictions(self, raw: Tensor) -> Tensor:
        return self.kind.predictions(raw)

    def render(self, pred: Any, target: Any = None) -> Any:
        return self.kind.render(pred, target, self.num_classes)

    def record(self) -> dict[str, Any]:
        """What an exported student's manifest keeps of the task (enough to rebuild it)."""
        return {
            "kind": self.kind.name,
            "stream": self.stream,
            "num_classes": self.num_classes,
            "out_channels": self.out_channels,
            "main_metric": self.main_metric,
            "class_names": self.class_names,
        }

    @classmethod
    def from_record(cls, name: str, record: dict[str, Any]) -> Task:
        return cls(
            name=name,
            kind=TASK_KINDS.build(record["kind"]),
            stream=record["stream"],
            num_classes=record.get("num_classes"),
            class_names=record.get("class_names"),
        )


def task_score(task: Task, results: dict[str, dict[str, Any]]) -> float:
    """A single task's selection score: its main metric, negated when lower is better."""
    value = float(results[task.name][task.main_metric])
    return value if task.higher_is_better else -value


def main_metrics(
    tasks: dict[str, Task], results: dict[str, dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """``{task: {main metric: value}}``: the subset of ``results`` that Δm uses."""
    return {
        t: {task.main_metric: float(results[t][task.main_metric])}
        for t, task in tasks.items()
        if t in results and results[t].get(task.main_metric) is not None
    }
