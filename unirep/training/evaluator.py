"""Evaluation over whole splits, gathered across processes, for any network and any tasks.

Every process runs its shard of a split (an ``accelerator``-prepared loader); each batch's
predictions, targets and sample ids are gathered with ``gather_for_metrics`` (which drops the
samples the sampler repeated to even out the shards), and every process updates the same
whole-split meters (one per task, from its :class:`~unirep.tasks.Task`). The result is identical
in every process and to a one-process evaluation.

Asked for them (``per_image=True``), each task's results also hold, under
:data:`~unirep.metrics.uncertainty.PER_IMAGE`, the per-image sums its main metric is a function
of (:func:`~unirep.metrics.uncertainty.image_sums`, with the images' ids): what the paired
bootstrap of :mod:`unirep.metrics.uncertainty` resamples to say how clear a difference is. They
are plain JSON, so a stored evaluation keeps them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from unirep.batch import sample_ids
from unirep.metrics.classification import delta_m
from unirep.metrics.uncertainty import PER_IMAGE, image_sums, per_image_record
from unirep.tasks import Task, main_metrics

Results = dict[str, dict[str, Any]]
"""``{task: {metric: value}}`` (None: not measured, e.g. an unlabelled test split); with
``per_image=True`` also ``{PER_IMAGE: {"metric", "ids", "sums"}}`` per task."""


class Evaluator:
    """Prepared, sharded loaders per (split, stream), reused by every phase of a run."""

    def __init__(self, accelerator: Any, batch_size: int, num_workers: int = 0) -> None:
        self.accelerator = accelerator
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._loaders: dict[tuple[str, str, int], Any] = {}

    def loader(self, split: str, stream: str, dataset: Dataset) -> Any:
        key = (split, stream, id(dataset))
        if key not in self._loaders:
            loader = DataLoader(
                dataset,
                self.batch_size,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,  # kept for the next validation
                pin_memory=self.accelerator.device.type == "cuda",
            )
            self._loaders[key] = self.accelerator.prepare_data_loader(loader)
        return self._loaders[key]

    @torch.no_grad()
    def evaluate(
        self,
        net: nn.Module,
        split: str,
        datasets: dict[str, Dataset],
        tasks: dict[str, Task],
        keep: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None,
        per_image: bool = False,
    ) -> Results:
        """``{task: {metric: value}}`` over the whole ``split`` for the tasks ``net`` predicts.

        Args:
            net: ``forward({stream: images}) -> {task: {"pred": ...}}``, with a ``tasks`` list.
            datasets: ``{stream: dataset}`` of the split.
            tasks: the tasks to measure (those of ``net`` whose stream is in ``datasets``).
            keep: filled with ``{task: (predictions, targets, ids)}`` over the split.
            per_image: add each task's per-image sums of its main metric under
                :data:`~unirep.metrics.uncertainty.PER_IMAGE` (tasks whose main metric has
                none are left without).
        """
        was_training = net.training
        net.eval()
        results: Results = {}
        for stream, dataset in datasets.items():
            mine = {n: t for n, t in tasks.items() if t.stream == stream and n in list(net.tasks)}
            if not mine:
                continue
            meters = {n: t.meter() for n, t in mine.items()}
            kept: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {n: [] for n in mine}
            sums: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in mine}
            for batch in self.loader(split, stream, dataset):
                with self.accelerator.autocast():
                    outputs = net({stream: batch["image"]})
                preds = {n: t.predictions(outputs[n]["pred"].float()) for n, t in mine.items()}
                targets = {n: batch[t.target_key] for n, t in mine.items()}
                preds, targets, ids = self.accelerator.gather_for_metrics(
                    (preds, targets, sample_ids(batch))
                )
                for n, task in mine.items():
                    meters[n].update(preds[n], targets[n])
                    if keep is not None:
                        kept[n].append((preds[n].cpu(), targets[n].cpu(), ids.cpu()))
                    if per_image:
                        found = image_sums(task.main_metric, preds[n], targets[n], task.num_classes)
                        if found is not None:
                            sums[n].append((ids.cpu(), found.cpu()))
            for n, meter in meters.items():
                results[n] = meter.compute()
                if keep is not None and kept[n]:
                    keep[n] = tuple(torch.cat(parts) for parts in zip(*kept[n], strict=True))  # type: ignore[assignment]
                if sums[n]:
                    image_ids, values = (torch.cat(p) for p in zip(*sums[n], strict=True))
                    results[n][PER_IMAGE] = per_image_record(mine[n].main_metric, image_ids, values)
        net.train(was_training)
        return results

    @torch.no_grad()
    def predictions(
        self, net: nn.Module, stream: str, images: Tensor, tasks: dict[str, Task]
    ) -> dict[str, Tensor]:
        """``{task: predictions}`` for a few images on this process (the report's grid)."""
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        outputs = net({stream: images.to(device)})
        net.train(was_training)
        return {
            n: t.predictions(outputs[n]["pred"].float()).float().cpu()
            for n, t in tasks.items()
            if n in outputs
        }


def without_per_image(results: Results) -> Results:
    """``results`` without the per-image sums of ``evaluate(..., per_image=True)``: metrics only."""
    return {t: {m: v for m, v in r.items() if m != PER_IMAGE} for t, r in results.items()}


def per_image_records(results: Results) -> dict[str, dict[str, Any]]:
    """``{task: per-image record}`` of the tasks of ``results`` that hold one."""
    return {t: r[PER_IMAGE] for t, r in results.items() if isinstance(r.get(PER_IMAGE), dict)}


def mean_metric(results: Results, metric: str) -> float | None:
    """Mean of ``metric`` over the tasks that have it (None where no task was measured)."""
    values = [r[metric] for r in results.values() if r.get(metric) is not None]
    return float(np.mean(values)) if values else None


def delta_m_score(tasks: dict[str, Task], reference: Results) -> Callable[[Results], float]:
    """Selection score: Δm (%) over main metrics against the teachers' validation results.

    Tasks whose teacher scores exactly 0 (relative change undefined) are left out; with none
    left the score is 0 (the first evaluation is kept).
    """
    ref = {
        t: m for t, m in main_metrics(tasks, reference).items() if all(v != 0 for v in m.values())
    }

    def score(results: Results) -> float:
        mine = {t: m for t, m in main_metrics(tasks, results).items() if t in ref}
        return delta_m(mine, ref) if mine else 0.0

    return score


def mean_main_metric_score(tasks: dict[str, Task]) -> Callable[[Results], float]:
    """Selection score: the mean over tasks of each main metric, negated where lower is better
    (one task: a teacher's own main metric)."""

    def score(results: Results) -> float:
        values = []
        for name, task in tasks.items():
            value = results.get(name, {}).get(task.main_metric)
            if value is not None:
                values.append(value if task.higher_is_better else -value)
        return float(np.mean(values)) if values else -float("inf")

    return score
