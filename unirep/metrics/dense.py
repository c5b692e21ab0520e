"""Metrics for dense prediction: semantic segmentation, depth and surface normals.

Every meter accumulates over the **whole split** and computes the metric once at the end. This
aligns the formulas that the reference code bases disagree on (see
``shared/reference/dense-methods.md``):

* mIoU comes from one confusion matrix summed over every test pixel (MTAN after its Nov-2020
  update, LibMTL, MTPSL), never from per-image or per-batch IoUs (xtask_mt, MTAN's paper);
* depth errors are pixel-accumulated means (MTPSL ``DepthMeter``), not means of batch means (MTAN);
* the normal-angle median is the exact median over every valid pixel of the split, not an
  average of batch medians (MTAN).

Conventions: accuracies and "within t°" scores are **fractions in [0, 1]** (as in
:mod:`unirep.metrics.classification`); angles are in degrees; depth errors are in the unit of the
targets.

Distributed evaluation: each meter has ``state()`` (a tensor) and ``merge(state)``. Sum-type
states (segmentation, depth) have a fixed shape and can be reduced with
``accelerator.reduce(state, "sum")``; the normal meter's state is a variable-length vector of
angles, so gather it with ``accelerate.utils.gather_object`` and merge each piece.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "NORMAL_THRESHOLDS",
    "DepthMeter",
    "NormalMeter",
    "SegmentationMeter",
]

NORMAL_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)
"""Angle thresholds (degrees) of the "within t°" normal scores (Eigen & Fergus, ICCV 2015)."""


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


# --------------------------------------------------------------------------------------------
# Semantic segmentation
# --------------------------------------------------------------------------------------------


class SegmentationMeter:
    """Mean IoU and pixel accuracy from a confusion matrix accumulated over the whole split.

    ``confusion[i, j]`` counts pixels of target class ``i`` predicted as class ``j`` (int64,
    kept on the device of the last input). Pixels whose target equals ``ignore_index`` or lies
    outside ``[0, num_classes)`` are skipped (NYUv2 uses ``-1``, Cityscapes often ``255``).

    ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` and mIoU is its mean over the classes whose union
    ``TP + FP + FN`` is non-zero, i.e. the classes that occur in the target or the prediction.
    When every class occurs this is exactly MTAN's / LibMTL's ``ConfMatrix`` result; where
    their ``torch.mean(iu)`` would return NaN (a class absent from both), the class is left out.
    Pixel accuracy is ``Σ_c TP_c / #valid pixels``.

    Args:
        num_classes: K, the number of classes.
        ignore_index: target value of unlabelled pixels.
    """

    metric_names: tuple[str, ...] = ("miou", "pixel_acc")
    """The keys :meth:`compute` returns, in reporting order."""

    def __init__(self, num_classes: int, ignore_index: int = -1) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Forget every pixel seen so far."""
        self.confusion = torch.zeros_like(self.confusion)

    @torch.no_grad()
    def update(self, logits_or_pred: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            logits_or_pred: ``[B, K, H, W]`` class scores (arg-max over K is the prediction) or
                ``[B, H, W]`` integer class predictions in ``[0, K)``.
            target: ``[B, H, W]`` class labels (integer, or float holding integers as in the
                MTAN ``.npy`` files).
        """
        k = self.num_classes
        if target.ndim != 3:
            raise ValueError(f"target must have shape [B, H, W], got {_shape(target)}")
        if logits_or_pred.ndim == 4:
            if logits_or_pred.shape[1] != k:
                raise ValueError(
                    f"logits have {logits_or_pred.shape[1]} channels but num_classes is {k}"
                )
            pred = logits_or_pred.argmax(dim=1)
        elif logits_or_pred.ndim == 3:
            if logits_or_pred.is_floating_point():
                raise ValueError("[B, H, W] predictions must be integer class indices, got floats")
            pred = logits_or_pred.long()
            if ((pred < 0) | (pred >= k)).any():
                raise ValueError(f"predicted class indices must lie in [0, {k})")
        else:
            raise ValueError(
                f"expected [B, K, H, W] logits or [B, H, W] predictions, "
                f"got {_shape(logits_or_pred)}"
            )
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction shape {_shape(pred)} does not match target shape {_shape(target)}"
            )
        target = target.to(pred.device).long()
        valid = (target != self.ignore_index) & (target >= 0) & (target < k)
        index = target[valid] * k + pred[valid]
        counts = torch.bincount(index, minlength=k * k).reshape(k, k)
        self.confusion = self.confusion.to(pred.device) + counts

    def state(self) -> Tensor:
        """A copy of the ``[K, K]`` int64 confusion matrix (sum it across processes)."""
        return self.confusion.clone()

    def merge(self, other_state: Tensor) -> None:
        """Add a confusion matrix from :meth:`state` of another meter (e.g. another process)."""
        k = self.num_classes
        if other_state.shape != (k, k):
            raise ValueError(f"state must have shape ({k}, {k}), got {_shape(other_state)}")
        self.confusion = self.confusion + other_state.to(self.confusion.device, torch.int64)

    @property
    def count(self) -> int:
        """Number of valid (labelled, in-range) pixels accumulated so far."""
        return int(self.confusion.sum().item())

    def class_iou(self) -> Tensor:
        """``[K]`` float64 per-class IoU; NaN for classes absent from target and prediction."""
        conf = self.confusion.double()
        tp = conf.diag()
        union = conf.sum(dim=0) + conf.sum(dim=1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def compute(self) -> dict[str, float]:
        """``{"miou", "pixel_acc"}``, fractions in [0, 1]; ``ValueError`` if no valid pixel."""
        total = self.count
        if total == 0:
            raise ValueError("SegmentationMeter has no valid pixels; mIoU is undefined")
        iou = self.class_iou()
        miou = iou[~iou.isnan()].mean()
        pixel_acc = self.confusion.diag().sum().double() / total
        return {"miou": float(miou.item()), "pixel_acc": float(pixel_acc.item())}


# --------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------


def _drop_channel(t: Tensor, name: str) -> Tensor:
    if t.ndim == 4:
        if t.shape[1] != 1:
            raise ValueError(f"{name} must have shape [B, 1, H, W] or [B, H, W], got {_shape(t)}")
        return t[:, 0]
    if t.ndim != 3:
        raise ValueError(f"{name} must have shape [B, 1, H, W] or [B, H, W], got {_shape(t)}")
    return t


class DepthMeter:
    """Absolute and relative depth error, pixel-accumulated over the whole split.

    Over the valid pixels ``V`` (target ``!= invalid_value``) of every batch seen:
    ``abs_err = Σ_V |p − t| / |V|`` and ``rel_err = Σ_V (|p − t| / t) / |V|`` (the MTAN /
    MTPSL formulas; MTAN averages them per batch, here every pixel weighs the same). The
    sums are float64. Targets must be non-zero on valid pixels for ``rel_err`` to be finite,
    which holds with the default ``invalid_value = 0`` (metric depth on NYUv2, inverse depth on
    Cityscapes).

    Args:
        invalid_value: target value that marks pixels without ground truth.
    """

    metric_names: tuple[str, ...] = ("abs_err", "rel_err")
    """The keys :meth:`compute` returns, in reporting order."""

    def __init__(self, invalid_value: float = 0.0) -> None:
        self.invalid_value = invalid_value
        # [Σ|p − t|, Σ|p − t| / t, #valid pixels]
        self._sums = torch.zeros(3, dtype=torch.float64)

    def reset(self) -> None:
        """Forget every pixel seen so far."""
        self._sums = torch.zeros_like(self._sums)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            pred: ``[B, 1, H, W]`` or ``[B, H, W]`` predicted depth.
            target: ``[B, 1, H, W]`` or ``[B, H, W]`` ground-truth depth.
        """
        pred = _drop_channel(pred, "pred")
        target = _drop_channel(target, "target")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred shape {_shape(pred)} does not match target shape {_shape(target)}"
            )
        target = target.to(pred.device)
        valid = target != self.invalid_value
        p = pred[valid].double()
        t = target[valid].double()
        err = (p - t).abs()
        batch = torch.stack([err.sum(), (err / t).sum(), valid.sum().double()])
        self._sums = self._sums.to(pred.device) + batch

    def state(self) -> Tensor:
        """A copy of ``[Σ|p − t|, Σ|p − t| / t, count]`` (float64; sum it across processes)."""
        return self._sums.clone()

    def merge(self, other_state: Tensor) -> None:
        """Add a state from :meth:`state` of another meter (e.g. another process)."""
        if other_state.shape != (3,):
            raise ValueError(f"state must have shape (3,), got {_shape(other_state)}")
        self._sums = self._sums + other_state.to(self._sums.device, torch.float64)

    @property
    def count(self) -> int:
        """Number of valid pixels accumulated so far."""
        return int(self._sums[2].item())

    def compute(self) -> dict[str, float]:
        """``{"abs_err", "rel_err"}``; ``ValueError`` if no valid pixel was seen."""
        count = self.count
        if count == 0:
            raise ValueError("DepthMeter has no valid pixels; depth errors are undefined")
        abs_sum, rel_sum = self._sums[0].item(), self._sums[1].item()
        return {"abs_err": abs_sum / count, "rel_err": rel_sum / count}


# --------------------------------------------------------------------------------------------
# Surface normals
# --------------------------------------------------------------------------------------------


class NormalMeter:
    """Angular error of surface normals: mean, exact median and "within t°" fractions.

    For every pixel whose target is not all-zero (the MTAN NYUv2 convention for "no ground
    truth"), ``angle = degrees(acos(clamp(<p̂, t̂>, −1, 1)))`` with ``p̂`` and ``t̂`` the
    L2-normalised prediction and target (normalising the target changes nothing for unit
    ground truth but keeps the angle correct for interpolated, non-unit targets; a zero
    prediction gives 90°). Sign convention: ``pred = target`` gives 0°, ``pred = −target``
    gives 180°.

    Every valid pixel's angle is kept (float32, on the CPU) so that the median is **exact over
    the whole split**: 4 bytes per valid pixel, e.g. at most 654 × 288 × 384 × 4 B ≈ 290 MB for
    the NYUv2 test split. The median of an even count is the mean of the two middle values.
    ``within_t`` is the fraction in [0, 1] of pixels with ``angle < t`` (strict, as in MTAN).
    """

    metric_names: tuple[str, ...] = (
        "angle_mean",
        "angle_median",
        "within_11.25",
        "within_22.5",
        "within_30",
    )
    """The keys :meth:`compute` returns, in reporting order."""

    def __init__(self) -> None:
        self._angles: list[Tensor] = []

    def reset(self) -> None:
        """Forget every pixel seen so far."""
        self._angles = []

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            pred: ``[B, 3, H, W]`` predicted normals (any length; normalised here).
            target: ``[B, 3, H, W]`` ground-truth unit normals, all-zero where invalid.
        """
        if pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(f"pred must have shape [B, 3, H, W], got {_shape(pred)}")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred shape {_shape(pred)} does not match target shape {_shape(target)}"
            )
        target = target.to(pred.device)
        valid = (target != 0).any(dim=1)  # [B, H, W]
        # [N, 3] valid pixels only; float64 so that identical vectors give ~0° rather than the
        # ~0.02° that float32 rounding of a dot product just below 1 produces.
        p = F.normalize(pred.permute(0, 2, 3, 1)[valid].double(), dim=1)
        t = F.normalize(target.permute(0, 2, 3, 1)[valid].double(), dim=1)
        cos = (p * t).sum(dim=1).clamp(-1.0, 1.0)
        self._angles.append(torch.rad2deg(torch.acos(cos)).float().cpu())

    def state(self) -> Tensor:
        """All angles accumulated so far: ``[N]`` float32 degrees on the CPU."""
        if not self._angles:
            return torch.zeros(0, dtype=torch.float32)
        if len(self._angles) > 1:
            self._angles = [torch.cat(self._angles)]
        return self._angles[0].clone()

    def merge(self, other_state: Tensor) -> None:
        """Append angles from :meth:`state` of another meter (e.g. another process)."""
        if other_state.ndim != 1:
            raise ValueError(f"state must have shape [N], got {_shape(other_state)}")
        self._angles.append(other_state.detach().to("cpu", torch.float32))

    @property
    def count(self) -> int:
        """Number of valid pixels accumulated so far."""
        return sum(a.numel() for a in self._angles)

    def compute(self) -> dict[str, float]:
        """``{"angle_mean", "angle_median", "within_11.25", "within_22.5", "within_30"}``.

        Angles in degrees, ``within_*`` as fractions in [0, 1]; ``ValueError`` if no valid pixel
        was seen.
        """
        angles = self.state()
        n = angles.numel()
        if n == 0:
            raise ValueError("NormalMeter has no valid pixels; angle errors are undefined")
        lower = angles.kthvalue((n + 1) // 2).values.double()
        upper = angles.kthvalue(n // 2 + 1).values.double() if n % 2 == 0 else lower
        result = {
            "angle_mean": float(angles.double().mean().item()),
            "angle_median": float(((lower + upper) / 2).item()),
        }
        for threshold in NORMAL_THRESHOLDS:
            key = f"within_{threshold:g}"
            result[key] = float((angles < threshold).double().mean().item())
        return result
