"""Dense-prediction losses: depth and surface normals, supervised and distilled.

Importing this module registers, into the existing zoos,

* :data:`~unirep.losses.task.TASK_LOSSES`: ``"depth_l1"``, ``"normal_cosine"`` and
  ``"depth_berhu"``, each with ``forward(pred, target) -> scalar``;
* :data:`~unirep.losses.distillation.PREDICTION_LOSSES`: ``"dense_l1"``, with
  ``forward(s, t) -> scalar`` (student first, teacher detached inside).

Invalid pixels never enter a computation: they are replaced by zeros before any arithmetic, so they
change neither the value nor the gradient, even when the prediction there is not finite. A batch
without a valid pixel gives 0, still connected to the graph (rather than ``0/0 = NaN``). Losses
compute in float32 (float64 stays float64) with autocast off.

The NYU-v2 conventions follow MTAN (Liu, Johns & Davison, CVPR 2019), whose preprocessed data and
losses are reused by URL (Li, Liu & Bilen, IJCV 2023, arXiv 2204.02744): depth 0 marks a missing
measurement and an all-zero normal marks a missing normal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.losses.distillation import (
    PREDICTION_LOSSES,
    _check_batch,
    _full_precision,
    _upcast,
)
from unirep.losses.task import TASK_LOSSES

__all__ = ["BerHuDepthLoss", "DenseL1Loss", "L1DepthLoss", "NormalCosineLoss"]


def _float_pair(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Both tensors in a common floating dtype of at least float32 (targets may be integers)."""
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    return pred.to(dtype), target.to(dtype)


def _depth_pair(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Bring a ``[B, H, W]`` target to ``[B, 1, H, W]`` and check it matches the prediction."""
    if target.dim() == 3:
        target = target.unsqueeze(1)
    if pred.dim() != 4 or pred.shape[1] != 1 or pred.shape != target.shape:
        raise ValueError(
            f"expected depth pred [B, 1, H, W] and target [B, 1, H, W] or [B, H, W], got "
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)}"
        )
    return pred, target


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over ``valid`` entries; 0 (in the graph) when none is valid."""
    total = torch.where(valid, values, torch.zeros_like(values)).sum()
    return total / valid.sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------
# depth
# ---------------------------------------------------------------------------------------------


def _valid_residual(pred: Tensor, target: Tensor, invalid_value: float) -> tuple[Tensor, Tensor]:
    """``(|pred − target|, valid)`` in float32, residual 0 where the target is invalid.

    Masking before any arithmetic keeps NaN or inf predictions on invalid pixels out of the loss
    and its gradient.
    """
    pred, target = _float_pair(pred, target)
    valid = target != invalid_value
    return torch.where(valid, pred - target, torch.zeros_like(pred)).abs(), valid


@TASK_LOSSES.register("depth_l1")
class L1DepthLoss(nn.Module):
    """Mean absolute depth error over valid pixels (MTAN, CVPR 2019; URL on NYU-v2).

    Shapes: pred ``[B, 1, H, W]``, target ``[B, 1, H, W]`` or ``[B, H, W]``. A pixel is valid when
    its target differs from ``invalid_value`` (0 in NYU-v2, where the sensor gave no reading).
    Reduces to ``Σ_valid |pred − target| / N_valid`` over the whole batch, so images with more
    valid pixels weigh more (as in the reference). Returns 0 when no pixel is valid.
    """

    def __init__(self, invalid_value: float = 0.0) -> None:
        super().__init__()
        self.invalid_value = invalid_value

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Return the mean L1 depth error over valid pixels."""
        pred, target = _depth_pair(pred, target)
        with _full_precision(pred.device):
            r, valid = _valid_residual(pred, target, self.invalid_value)
            return _masked_mean(r, valid)


@TASK_LOSSES.register("depth_berhu")
class BerHuDepthLoss(nn.Module):
    """Reverse Huber (berHu) depth loss (Laina et al., "Deeper Depth Prediction with Fully
    Convolutional Residual Networks", 3DV 2016).

    Per valid pixel with residual ``r = |pred − target|``: ``r`` if ``r ≤ c``, else
    ``(r² + c²) / (2c)``, with ``c = threshold · max r`` over the valid pixels of the batch
    (``threshold = 0.2`` in the paper). ``c`` is treated as a constant for the gradient. The loss is
    continuous at ``r = c``, L1 for small residuals and L2 for large ones. Shapes, validity and
    reduction as :class:`L1DepthLoss`; 0 when no pixel is valid or every residual is 0.
    """

    def __init__(self, threshold: float = 0.2, invalid_value: float = 0.0) -> None:
        super().__init__()
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.invalid_value = invalid_value

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Return the mean berHu depth loss over valid pixels."""
        pred, target = _depth_pair(pred, target)
        with _full_precision(pred.device):
            r, valid = _valid_residual(pred, target, self.invalid_value)
            c = self.threshold * r.detach().max()  # invalid residuals are 0, so they never win
            # Divide by a positive number even when c = 0, where the quadratic branch is unused.
            quadratic = (r.pow(2) + c.pow(2)) / (2.0 * c.clamp_min(torch.finfo(r.dtype).tiny))
            return _masked_mean(torch.where(r <= c, r, quadratic), valid)


# ---------------------------------------------------------------------------------------------
# surface normals
# ---------------------------------------------------------------------------------------------


@TASK_LOSSES.register("normal_cosine")
class NormalCosineLoss(nn.Module):
    """``1 −`` mean cosine between predicted and true normals (MTAN, CVPR 2019; URL on NYU-v2).

    Shapes: pred and target ``[B, 3, H, W]``. Both are L2-normalised along the channel dimension
    (``eps`` keeps a zero vector at zero instead of NaN), so the loss ignores the prediction's
    scale; for the unit-length NYU-v2 targets this equals the reference's ``1 − mean(pred·gt)``.
    A pixel is valid when its target is not all-zero. Reduces to
    ``Σ_valid (1 − cos) / N_valid`` over the batch, a value in ``[0, 2]``; 0 when no pixel is
    valid.
    """

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Return ``1 −`` the mean cosine similarity over valid pixels."""
        if pred.dim() != 4 or pred.shape[1] != 3 or pred.shape != target.shape:
            raise ValueError(
                f"expected normals pred and target [B, 3, H, W], got pred {tuple(pred.shape)} "
                f"and target {tuple(target.shape)}"
            )
        with _full_precision(pred.device):
            pred, target = _float_pair(pred, target)
            valid = (target != 0).any(dim=1, keepdim=True)  # [B, 1, H, W]
            pred = torch.where(valid, pred, torch.zeros_like(pred))
            pred = F.normalize(pred, dim=1, eps=self.eps)
            target = F.normalize(target, dim=1, eps=self.eps)
            cosine = (pred * target).sum(dim=1, keepdim=True)
            return _masked_mean(1.0 - cosine, valid)


# ---------------------------------------------------------------------------------------------
# dense prediction distillation
# ---------------------------------------------------------------------------------------------


@PREDICTION_LOSSES.register("dense_l1")
class DenseL1Loss(nn.Module):
    """Per-pixel L1 distance from the student's dense prediction to the teacher's.

    Used to distil a teacher's depth or normal map into the student's head (the optional
    prediction term of dense distillation, cf. URL, IJCV 2023). Shapes: student and teacher
    ``[B, C, H, W]`` (``C = 1`` for depth, 3 for normals), identical. With ``normalize_channels``
    both maps are first L2-normalised along dim 1, so only directions are compared (for normals,
    whose heads may not output unit vectors). The absolute difference is summed over channels and
    averaged over the batch and all pixels: ``mean_{b,h,w} ‖s[b,:,h,w] − t[b,:,h,w]‖₁``. The
    teacher is detached; there is no validity mask, since the teacher predicts every pixel.
    """

    def __init__(self, normalize_channels: bool = False, eps: float = 1e-12) -> None:
        super().__init__()
        self.normalize_channels = normalize_channels
        self.eps = eps

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        """Return the mean per-pixel L1 distance for student ``s`` and teacher ``t``."""
        _check_batch(s, t, min_dim=2, same_shape="predictions")
        with _full_precision(s.device):
            s, t = _upcast(s, t)
            if self.normalize_channels:
                s = F.normalize(s, dim=1, eps=self.eps)
                t = F.normalize(t, dim=1, eps=self.eps)
            return (s - t).abs().sum(dim=1).mean()
