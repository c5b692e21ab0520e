"""Dense evaluation over a whole split, gathered across processes; Δm-based model selection.

Every process runs its shard of the split (an ``accelerator``-prepared loader); predictions and
targets of each batch are gathered with ``gather_for_metrics`` (which drops the samples the
sampler repeated to even out the shards), and every process updates the same meters
(:mod:`unirep.dense_metrics`) with the whole batch. The result is therefore identical in every
process and to a one-process evaluation: one confusion matrix, pixel-accumulated depth errors and
the exact median angle over all pixels of the split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from unirep.dense_metrics import METRIC_NAMES, DepthMeter, NormalMeter, SegmentationMeter
from unirep.metrics import METRIC_HIGHER_IS_BETTER, delta_m
from unirep.trainer import Evaluator

__all__ = ["MAIN_METRIC", "DenseEvaluator", "main_metrics", "selection_delta_m", "task_score"]

MAIN_METRIC: dict[str, str] = {"semantic": "miou", "depth": "abs_err", "normal": "angle_mean"}
"""The metric of each task that enters Δm and selection (MTAN, URL, MTPSL, Auto-Lambda)."""


def main_metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{task: {main metric: value}}``: the subset of ``results`` that Δm uses."""
    return {
        t: {MAIN_METRIC[t]: float(r[MAIN_METRIC[t]])}
        for t, r in results.items()
        if t in MAIN_METRIC and r.get(MAIN_METRIC[t]) is not None
    }


def task_score(task: str, results: dict[str, dict[str, Any]]) -> float:
    """A single-task teacher's selection score: its main metric, negated when lower is better."""
    metric = MAIN_METRIC[task]
    value = float(results[task][metric])
    return value if METRIC_HIGHER_IS_BETTER[metric] else -value


def selection_delta_m(
    reference: dict[str, dict[str, Any]],
) -> Callable[[dict[str, dict[str, Any]]], float]:
    """Score function: Δm (%) of validation results against the teachers' validation results.

    Tasks whose teacher scores exactly 0 on validation (an untrained teacher: relative change is
    undefined) are left out of the selection Δm; with none left the score is 0 (first kept).
    """
    ref = {t: m for t, m in main_metrics(reference).items() if all(v != 0 for v in m.values())}

    def score(results: dict[str, dict[str, Any]]) -> float:
        mine = {t: m for t, m in main_metrics(results).items() if t in ref}
        return delta_m(mine, ref) if mine else 0.0

    return score


class DenseEvaluator(Evaluator):
    """Whole-split dense metrics of a (multi- or single-task) dense network.

    Args:
        accelerator: the run's Accelerator.
        batch_size: evaluation batch size per process.
        num_workers: DataLoader workers.
        num_classes: semantic classes (confusion-matrix size).
        ignore_index: label of unlabelled pixels (-1 in the MTAN format).
    """

    def __init__(
        self,
        accelerator: Any,
        batch_size: int,
        num_workers: int = 0,
        num_classes: int = 13,
        ignore_index: int = -1,
    ) -> None:
        super().__init__(accelerator, batch_size, num_workers)
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def _meters(self, tasks: list[str]) -> dict[str, Any]:
        make = {
            "semantic": lambda: SegmentationMeter(self.num_classes, self.ignore_index),
            "depth": DepthMeter,
            "normal": NormalMeter,
        }
        return {t: make[t]() for t in tasks}

    @torch.no_grad()
    def evaluate(
        self, net: nn.Module, split: str, datasets: dict[str, Dataset]
    ) -> dict[str, dict[str, float | None]]:
        """``{task: {metric: value}}`` over the whole ``split`` for every task of ``net``.

        ``datasets`` holds one entry (the benchmark's split). A task with no valid pixel in the
        split gets None for its metrics.
        """
        ((name, dataset),) = datasets.items()
        tasks = list(net.tasks)
        meters = self._meters(tasks)
        was_training = net.training
        net.eval()
        for batch in self.loader(split, name, dataset):
            with self.accelerator.autocast():
                outputs = net(batch["image"])
            preds: dict[str, Tensor] = {}
            for task in tasks:
                pred = outputs[task]["pred"].float()
                preds[task] = pred.argmax(1) if task == "semantic" else pred
            targets = {t: batch[t] for t in tasks}
            preds, targets = self.accelerator.gather_for_metrics((preds, targets))
            for task in tasks:
                meters[task].update(preds[task], targets[task])
        net.train(was_training)
        results: dict[str, dict[str, float | None]] = {}
        for task, meter in meters.items():
            try:
                results[task] = dict(meter.compute())
            except ValueError:  # no valid pixel for this task in the split
                results[task] = dict.fromkeys(METRIC_NAMES[task])
        return results

    @torch.no_grad()
    def predictions(self, net: nn.Module, images: Tensor) -> dict[str, Tensor]:
        """``{task: prediction}`` for a few images on this process (for the qualitative grid):
        semantic ``[B, H, W]`` class ids, depth ``[B, 1, H, W]``, normal ``[B, 3, H, W]``."""
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        outputs = net(images.to(device))
        net.train(was_training)
        return {
            t: (o["pred"].argmax(1) if t == "semantic" else o["pred"]).float().cpu()
            for t, o in outputs.items()
        }
