"""How clear a difference between two models is: paired bootstrap, McNemar's test, seeds.

Two models scored on the same test images differ by chance as well as by skill: a few images
more or less right move a mean accuracy by tenths of a point. This module measures that chance.

* :func:`image_sums`: per image, the additive sums a whole-split main metric is a function of
  (accuracy: correct and labelled images; mIoU: per class the true-positive, target and
  predicted pixels; depth ``abs_err``: Σ|p − t| and valid pixels; normal ``angle_mean``: Σ angle
  and valid pixels). :func:`split_value` of their sum over any multiset of images is the metric
  the meters of :mod:`unirep.metrics.classification` / :mod:`unirep.metrics.dense` compute over
  those images, so a resample of images is scored exactly as a split is (mIoU from one summed
  confusion, errors pixel-accumulated), never as a mean of per-image scores.
* :func:`paired_bootstrap`: both models' metrics over resamples of the images, the same draw for
  both (paired), drawn within each input stream (stratified: a Visual Decathlon domain keeps its
  size), from a fixed seed. :func:`compare` turns them into the difference of the run's headline
  (mean accuracy in percentage points, or Δm in %) with a 95 % percentile interval and a
  :func:`verdict`; for accuracy it adds McNemar's exact test per task (:func:`mcnemar_exact`).
* :func:`mean_interval`: the spread over several runs (seeds) and Student's t interval of the
  mean difference.

Only numpy and the standard library: no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from unirep.metrics.classification import METRIC_HIGHER_IS_BETTER

__all__ = [
    "LEVEL",
    "PER_IMAGE",
    "RESAMPLES",
    "SEED",
    "SUPPORTED_METRICS",
    "PairedTask",
    "compare",
    "image_sums",
    "interval",
    "mcnemar_chi2",
    "mcnemar_exact",
    "mean_interval",
    "paired_bootstrap",
    "per_image_record",
    "split_value",
    "t_quantile",
    "verdict",
]

PER_IMAGE = "per_image"
"""The key of a task's evaluation results that holds its per-image sums (:func:`per_image_record`),
beside its metrics, when the evaluation is asked for them."""

RESAMPLES = 1000
"""Bootstrap resamples of the test images."""

SEED = 0
"""Seed of the bootstrap's draws: the same run gives the same interval every time."""

LEVEL = 0.95
"""Coverage of the intervals."""

SUPPORTED_METRICS: tuple[str, ...] = ("accuracy", "miou", "abs_err", "angle_mean")
"""The main metrics :func:`image_sums` decomposes per image."""

NO_CLEAR_DIFFERENCE = "no clear difference"
CLEARLY_BETTER = "clearly better"
CLEARLY_WORSE = "clearly worse"

_BLOCK = 250  # resamples drawn at once (bounds the [block, images] weight matrix)
_FEW_ROWS = 64  # up to this many distinct rows, resamples are multinomial draws over them


# --------------------------------------------------------------------------------------------
# Per-image sums of the main metrics
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def image_sums(
    metric: str, pred: Tensor, target: Tensor, num_classes: int | None = None
) -> Tensor | None:
    """``[B, d]`` per-image sums of ``metric`` (None: a metric this module does not decompose).

    Predictions and targets are what the task's meter takes, with the meter's conventions:
    labels ``< 0`` unlabelled (accuracy); targets outside ``[0, K)`` ignored (mIoU); depth 0
    invalid; an all-zero normal invalid. Counts are int64, sums of errors float64.
    """
    if metric == "accuracy":
        return _accuracy_sums(pred, target)
    if metric == "miou":
        if num_classes is None:
            raise ValueError("per-image mIoU sums need the number of classes")
        return _segmentation_sums(pred, target, num_classes)
    if metric == "abs_err":
        return _depth_sums(pred, target)
    if metric == "angle_mean":
        return _angle_sums(pred, target)
    return None


def _accuracy_sums(pred: Tensor, target: Tensor) -> Tensor:
    """``[correct, labelled]`` per image (AccuracyMeter)."""
    if pred.ndim == 2:
        pred = pred.argmax(dim=1)
    target = target.to(pred.device).long()
    valid = target >= 0
    correct = (pred.long() == target) & valid
    return torch.stack([correct, valid], dim=1).long()


def _segmentation_sums(pred: Tensor, target: Tensor, k: int) -> Tensor:
    """``[TP_c, target_c, predicted_c]`` pixel counts per class (3K columns) per image: the row
    sums, column sums and diagonal of the image's confusion matrix (SegmentationMeter)."""
    if pred.ndim == 4:
        pred = pred.argmax(dim=1)
    pred = pred.long()
    target = target.to(pred.device).long()
    b = pred.shape[0]
    valid = (target >= 0) & (target < k)  # the meter's ignore_index (-1) and out-of-range labels
    image = torch.arange(b, device=pred.device).view(b, *([1] * (target.ndim - 1)))
    base = image.expand_as(target)[valid] * k
    t, p = target[valid], pred[valid]
    if p.numel() and (p.min() < 0 or p.max() >= k):
        raise ValueError(f"predicted class indices must lie in [0, {k})")
    size = b * k
    tp = torch.bincount((base + t)[t == p], minlength=size).view(b, k)
    gt = torch.bincount(base + t, minlength=size).view(b, k)
    pr = torch.bincount(base + p, minlength=size).view(b, k)
    return torch.cat([tp, gt, pr], dim=1)


def _channel_free(t: Tensor) -> Tensor:
    return t[:, 0] if t.ndim == 4 else t


def _depth_sums(pred: Tensor, target: Tensor) -> Tensor:
    """``[Σ|p − t|, valid pixels]`` per image over pixels whose target is not 0 (DepthMeter)."""
    pred, target = _channel_free(pred), _channel_free(target).to(pred.device)
    valid = target != 0
    err = torch.where(valid, (pred.double() - target.double()).abs(), 0.0)
    dims = tuple(range(1, err.ndim))
    return torch.stack([err.sum(dim=dims), valid.sum(dim=dims).double()], dim=1)


def _angle_sums(pred: Tensor, target: Tensor) -> Tensor:
    """``[Σ angle (degrees), valid pixels]`` per image over pixels whose target is not all zero;
    the angle as NormalMeter computes it (float64 unit vectors, kept as float32)."""
    target = target.to(pred.device)
    valid = (target != 0).any(dim=1)
    p = F.normalize(pred.permute(0, 2, 3, 1).double(), dim=-1)
    t = F.normalize(target.permute(0, 2, 3, 1).double(), dim=-1)
    cos = (p * t).sum(dim=-1).clamp(-1.0, 1.0)
    angle = torch.rad2deg(torch.acos(cos)).float().double()
    angle = torch.where(valid, angle, 0.0)
    return torch.stack([angle.sum(dim=(1, 2)), valid.sum(dim=(1, 2)).double()], dim=1)


def split_value(metric: str, sums: Any) -> np.ndarray:
    """The metric of summed per-image sums ``[..., d]`` (any leading shape: resamples); NaN
    where it is undefined (nothing labelled or valid). Accuracy and mIoU are fractions."""
    s = np.asarray(sums, dtype=np.float64)
    if metric == "miou":
        k = s.shape[-1] // 3
        tp, gt, pr = s[..., :k], s[..., k : 2 * k], s[..., 2 * k :]
        union = gt + pr - tp
        present = union > 0
        iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
        classes = present.sum(axis=-1)
        total = iou.sum(axis=-1)
        return np.divide(total, classes, out=np.full(total.shape, np.nan), where=classes > 0)
    if metric not in SUPPORTED_METRICS:
        raise ValueError(f"no per-image sums for metric {metric!r}")
    num, den = s[..., 0], s[..., 1]
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def per_image_record(metric: str, ids: Tensor, sums: Tensor) -> dict[str, Any]:
    """The JSON-ready record of one task's per-image sums over a split (stored with the
    evaluation, so that a resumed run reads back the same numbers)."""
    return {
        "metric": metric,
        "ids": [int(i) for i in ids.tolist()],
        "sums": sums.tolist(),
    }


# --------------------------------------------------------------------------------------------
# Paired bootstrap
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedTask:
    """One task's per-image sums of two models on the same images, in the same order.

    Attributes:
        metric: the main metric the sums decompose (:data:`SUPPORTED_METRICS`).
        stream: the input stream of the images; images are resampled within a stream.
        a, b: ``[n, d]`` per-image sums of model A and model B (the reference).
    """

    metric: str
    stream: str
    a: np.ndarray
    b: np.ndarray


def _resampled_sums(matrix: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``[R, D]`` column sums of ``matrix`` ``[n, D]`` over R draws of n rows with replacement.

    Identical rows are one category with its multiplicity: with few distinct rows
    (classification: a handful of (correct, correct) pairs) the draw is a multinomial over them,
    O(R × distinct rows) at any number of images; otherwise each resample draws n row indices
    and counts them. Both are the same distribution as drawing images.
    """
    n = matrix.shape[0]
    rows, inverse, counts = np.unique(matrix, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    k = rows.shape[0]
    out = np.empty((resamples, matrix.shape[1]), dtype=np.float64)
    for start in range(0, resamples, _BLOCK):
        size = min(_BLOCK, resamples - start)
        if k <= _FEW_ROWS:
            weights = rng.multinomial(n, counts / n, size=size)
        else:
            drawn = inverse[rng.integers(0, n, size=(size, n))]
            drawn += np.arange(size)[:, None] * k
            weights = np.bincount(drawn.reshape(-1), minlength=size * k).reshape(size, k)
        out[start : start + size] = weights.astype(np.float64) @ rows
    return out


def paired_bootstrap(
    tasks: Mapping[str, PairedTask], resamples: int = RESAMPLES, seed: int = SEED
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{task: (metric of A, metric of B)}``, each ``[1 + resamples]``: index 0 over the images
    as they are, then one value per resample of the images.

    Every resample draws each stream's n images with replacement (streams in the order of
    ``tasks``, one generator seeded with ``seed``); A and B are scored on the same draw, and the
    tasks of one stream (a dense benchmark's) on the same images.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for stream in dict.fromkeys(t.stream for t in tasks.values()):
        mine = {name: t for name, t in tasks.items() if t.stream == stream}
        sizes = {m.shape[0] for t in mine.values() for m in (t.a, t.b)}
        if len(sizes) != 1:
            raise ValueError(f"stream {stream!r}: the paired sums cover different images {sizes}")
        matrix = np.concatenate(
            [np.asarray(m, dtype=np.float64) for t in mine.values() for m in (t.a, t.b)], axis=1
        )
        sums = np.concatenate([matrix.sum(axis=0, keepdims=True),
                               _resampled_sums(matrix, resamples, rng)])  # fmt: skip
        at = 0
        for name, t in mine.items():
            da, db = t.a.shape[1], t.b.shape[1]
            va = split_value(t.metric, sums[:, at : at + da])
            vb = split_value(t.metric, sums[:, at + da : at + da + db])
            out[name] = (va, vb)
            at += da + db
    return out


def interval(samples: Any, level: float = LEVEL) -> tuple[float, float] | None:
    """The percentile interval of the finite ``samples`` (None when none is finite)."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(s, [tail, 100.0 - tail])
    return float(lo), float(hi)


def verdict(ci: Sequence[float], higher_is_better: bool = True) -> str:
    """``"no clear difference"`` when the interval holds 0; else ``"clearly better"`` or
    ``"clearly worse"`` (for A against B, in the metric's direction)."""
    lo, hi = ci
    if lo <= 0.0 <= hi:
        return NO_CLEAR_DIFFERENCE
    return CLEARLY_BETTER if (lo > 0.0) == higher_is_better else CLEARLY_WORSE


# --------------------------------------------------------------------------------------------
# McNemar's test
# --------------------------------------------------------------------------------------------


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: ``b`` images only A gets right, ``c`` only B.

    Under "no difference" each discordant image is a fair coin: ``p = min(1, 2 · P(X ≤
    min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)``, summed in log space (exact at any size).
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    i = np.arange(1, k + 1, dtype=np.float64)
    log_comb = np.concatenate([[0.0], np.cumsum(np.log(n - i + 1) - np.log(i))])
    log_terms = log_comb - n * math.log(2.0)
    top = float(log_terms.max())
    p = 2.0 * math.exp(top) * float(np.exp(log_terms - top).sum())
    return min(1.0, p)


def mcnemar_chi2(b: int, c: int) -> float:
    """McNemar's χ² p-value with Edwards' continuity correction, ``(|b − c| − 1)² / (b + c)``
    on one degree of freedom (close to :func:`mcnemar_exact` once b + c is large)."""
    n = b + c
    if n == 0:
        return 1.0
    x = max(0.0, abs(b - c) - 1.0) ** 2 / n
    return math.erfc(math.sqrt(x / 2.0))


# --------------------------------------------------------------------------------------------
# Comparing two models
# --------------------------------------------------------------------------------------------


def _aligned(records: Sequence[Mapping[str, Any]]) -> list[np.ndarray] | None:
    """The ``[n, d]`` sums of ``records`` (one stream's, both models') on their common images:
    matched by image id where every record's ids are distinct, else by position when the
    records have the same length (a dataset without ids, read in the same order); else None."""
    ids = [np.asarray(r["ids"], dtype=np.int64) for r in records]
    if any(i.size == 0 or len(r["sums"]) != i.size for r, i in zip(records, ids, strict=True)):
        return None
    sums = [np.asarray(r["sums"], dtype=np.float64).reshape(len(i), -1) for r, i in
            zip(records, ids, strict=True)]  # fmt: skip
    if all(len(np.unique(i)) == len(i) and i.min() >= 0 for i in ids):
        common = ids[0]
        for i in ids[1:]:
            common = np.intersect1d(common, i)
        if common.size == 0:
            return None
        out = []
        for i, s in zip(ids, sums, strict=True):
            order = np.argsort(i)
            out.append(s[order[np.searchsorted(i, common, sorter=order)]])
        return out
    if len({len(i) for i in ids}) == 1:
        return sums
    return None


def _per_task_unit(metric: str) -> tuple[float, str]:
    """(scale, unit) of a per-task difference: fractions in points, angles in degrees."""
    if metric in ("accuracy", "miou"):
        return 100.0, "percentage points"
    if metric == "angle_mean":
        return 1.0, "degrees"
    return 1.0, "units of the target"


def compare(
    a: Mapping[str, Mapping[str, Any]],
    b: Mapping[str, Mapping[str, Any]],
    streams: Mapping[str, str],
    headline: str,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict[str, Any] | None:
    """Model A against model B (the reference) on the run's headline, with its uncertainty.

    Args:
        a, b: ``{task: per-image record}`` (:func:`per_image_record`) of the two models.
        streams: ``{task: input stream}`` of every task of the run, in the run's order.
        headline: ``"mean_accuracy"`` (the mean over tasks of A's accuracy minus B's, in
            percentage points) or ``"delta_m"`` (A's Δm in % with B as the reference).

    Returns:
        ``{"quantity", "difference", "ci95", "unit", "verdict", "method", "resamples", "seed",
        "images", "per_task"}`` (per task: its main metric's difference in its own unit, interval,
        verdict and images; for accuracy also McNemar's exact p and the discordant counts
        ``[only A right, only B right]``), or None when a task of ``streams`` has no usable
        record in A or B, the records share no image, or the difference is undefined.
    """
    if headline not in ("mean_accuracy", "delta_m"):
        raise ValueError(f"unknown headline {headline!r}")
    paired: dict[str, PairedTask] = {}
    for stream in dict.fromkeys(streams.values()):
        names = [t for t, s in streams.items() if s == stream]
        records = [r.get(t) for t in names for r in (a, b)]
        if any(r is None or r.get("metric") not in SUPPORTED_METRICS for r in records):
            return None
        if any(a[t]["metric"] != b[t]["metric"] for t in names):
            return None
        aligned = _aligned(records)  # type: ignore[arg-type]
        if aligned is None:
            return None
        for j, t in enumerate(names):
            paired[t] = PairedTask(a[t]["metric"], stream, aligned[2 * j], aligned[2 * j + 1])
    if not paired or (headline == "mean_accuracy" and any(
            p.metric != "accuracy" for p in paired.values())):  # fmt: skip
        return None
    values = paired_bootstrap(paired, resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        if headline == "mean_accuracy":
            samples = 100.0 * np.mean([va - vb for va, vb in values.values()], axis=0)
            quantity, unit = "mean accuracy", "percentage points"
        else:
            terms = [
                (1.0 if METRIC_HIGHER_IS_BETTER[paired[t].metric] else -1.0)
                * (va - vb)
                / np.abs(vb)
                for t, (va, vb) in values.items()
            ]
            samples = 100.0 * np.mean(terms, axis=0)
            quantity, unit = "Δm", "%"
    ci = interval(samples[1:])
    if not math.isfinite(float(samples[0])) or ci is None:
        return None
    per_task = {t: _task_entry(paired[t], *values[t]) for t in paired}
    images = {p.stream: int(p.a.shape[0]) for p in paired.values()}  # per stream
    return {
        "quantity": quantity,
        "difference": float(samples[0]),
        "ci95": list(ci),
        "unit": unit,
        "verdict": verdict(ci),
        "method": (
            f"paired bootstrap over the evaluated images ({resamples} resamples, seed {seed}; "
            + ("each input stream resampled on its own; " if len(images) > 1 else "")
            + "2.5 and 97.5 percentiles)"
        ),
        "resamples": resamples,
        "seed": seed,
        "images": sum(images.values()),
        "per_task": per_task,
    }


def _task_entry(task: PairedTask, va: np.ndarray, vb: np.ndarray) -> dict[str, Any]:
    """One task's difference (A − B in its metric's unit), interval, verdict and images; for
    accuracy McNemar's exact p and the discordant counts."""
    scale, unit = _per_task_unit(task.metric)
    diff = scale * (va - vb)
    ci = interval(diff[1:])
    entry: dict[str, Any] = {
        "metric": task.metric,
        "difference": float(diff[0]) if math.isfinite(float(diff[0])) else None,
        "ci95": list(ci) if ci is not None else None,
        "unit": unit,
        "verdict": (verdict(ci, METRIC_HIGHER_IS_BETTER[task.metric]) if ci is not None else None),
        "images": int(task.a.shape[0]),
    }
    if task.metric == "accuracy":
        labelled = (task.a[:, 1] > 0) & (task.b[:, 1] > 0)
        right_a, right_b = task.a[:, 0] > 0, task.b[:, 0] > 0
        only_a = int((labelled & right_a & ~right_b).sum())
        only_b = int((labelled & ~right_a & right_b).sum())
        entry["mcnemar_p"] = mcnemar_exact(only_a, only_b)
        entry["discordant"] = [only_a, only_b]
    return entry


# --------------------------------------------------------------------------------------------
# Several runs (seeds)
# --------------------------------------------------------------------------------------------

# Student's t quantile t_{0.975, df} for df = 1 … 30.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile(df: int) -> float:
    """Student's t quantile of 0.975 (a two-sided 95 % interval) on ``df`` degrees of freedom:
    the table up to 30, beyond it the Cornish–Fisher expansion around the normal's 1.96."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_interval(values: Sequence[float]) -> dict[str, Any] | None:
    """Mean, sample standard deviation and the 95 % t interval of the mean of ``values`` (one
    per run, e.g. per seed); ``std`` and ``ci95`` are None for a single run; None for none."""
    x = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not x:
        return None
    n = len(x)
    mean = math.fsum(x) / n
    if n < 2:
        return {"mean": mean, "std": None, "ci95": None, "runs": 1}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in x) / (n - 1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "runs": n}
