"""Supervised task losses, keyed by short names in :data:`TASK_LOSSES`.

Each loss is an ``nn.Module`` with ``forward(logits, labels) -> scalar``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from unirep.registry import Registry

__all__ = ["TASK_LOSSES", "CrossEntropyTaskLoss"]

TASK_LOSSES: Registry[nn.Module] = Registry("task loss")


@TASK_LOSSES.register("cross_entropy")
class CrossEntropyTaskLoss(nn.Module):
    """Cross-entropy on logits, optionally label-smoothed (Szegedy et al., CVPR 2016).

    Shapes: logits ``[B, K]`` and integer labels ``[B]`` (classification), or logits
    ``[B, K, H, W]`` and labels ``[B, H, W]`` (segmentation). Averages over the labelled entries,
    i.e. those whose label is not ``ignore_index`` (``-1`` marks unlabelled pixels in NYU-v2 and
    missing labels when tasks are only partly annotated). A batch with no labelled entry gives 0
    (still connected to the graph) instead of PyTorch's NaN.
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -1) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Return the mean cross-entropy over labelled entries."""
        total = F.cross_entropy(
            logits,
            labels,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )
        num_labelled = (labels != self.ignore_index).sum().clamp_min(1)
        return total / num_labelled
