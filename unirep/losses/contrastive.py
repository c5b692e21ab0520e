"""In-batch contrastive losses (InfoNCE) that give the same result on one or many processes.

* :func:`gather_batch`: the global batch across processes, autograd flowing to the local slice.
* :func:`info_nce`: InfoNCE (van den Oord, Li & Vinyals, "Representation Learning with
  Contrastive Predictive Coding", 2018) with the other rows of the *global* batch as negatives.
  Its value on every process is the loss of the whole global batch, and under DDP's gradient mean
  its gradient is exactly that of one process holding the whole batch (see :func:`info_nce`).
* :class:`InfoNCEFeatureLoss`, registered as ``FEATURE_LOSSES["infonce"]``: CRD-style
  contrastive feature distillation (Tian, Krishnan & Isola, "Contrastive Representation
  Distillation", ICLR 2020), with in-batch negatives instead of CRD's memory bank.

Losses compute in float32 (float64 inputs stay float64) with autocast off, as the other
distillation losses (:mod:`unirep.losses.distillation`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.losses.distillation import FEATURE_LOSSES, _full_precision

__all__ = ["InfoNCEFeatureLoss", "gather_batch", "info_nce"]


def _world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_batch(x: Tensor) -> Tensor:
    """Concatenate every process's ``x`` along dim 0, in rank order.

    Shapes: ``[B_r, ...]`` on each process, the same ``B_r`` everywhere (``all_gather`` needs
    equal shapes) → ``[world · B_r, ...]``. The local slice is ``x`` itself, so autograd flows to
    it; the other slices are detached copies received by ``dist.all_gather``. This is a
    collective: every process must call it, in the same order. Without an initialised process
    group, or with one process, ``x`` is returned unchanged.
    """
    rank, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, 0)


def info_nce(
    anchors: Tensor, candidates: Tensor, temperature: float = 0.1, symmetric: bool = False
) -> Tensor:
    """InfoNCE over the global batch: anchor row ``i`` should pick candidate row ``i``.

    Shapes: ``anchors`` and ``candidates`` ``[B, D]`` (``B`` rows on this process) → scalar.
    Both are L2-normalised along ``D`` (in at least float32), gathered across processes with
    :func:`gather_batch` into ``[N, D]``, ``N = world · B``, and the loss is

        ``L = mean_i CE(â_i · ĉᵀ / τ, i)``  (``i`` over the ``N`` global rows),

    the positive on the diagonal and the other ``N − 1`` candidates as negatives. With
    ``symmetric`` it is the average of that and the same with the roles swapped
    (``ĉ · âᵀ / τ``, CLIP-style).

    Distributed gradient: every process computes the same global ``L``, but its graph reaches
    only its own slices (the others are detached copies), so process ``r`` obtains ``∂L/∂x_r``,
    exactly the one-process gradient of ``L`` with respect to its rows. DDP then *averages* the
    parameter gradients over the ``W`` processes, which would give ``(1/W) Σ_r ∂L/∂x_r ·
    ∂x_r/∂θ``, ``W`` times too small. So the function returns
    ``L + (W − 1) · (L − L.detach())``: its value is ``L`` exactly (the added term is an exact
    zero) and its gradient is ``W · ∂L/∂x_r``; after DDP's mean the parameters receive exactly
    the one-process gradient ``dL/dθ``. The gradient on a local input tensor (not averaged by
    DDP) is therefore ``W`` times its slice of the one-process gradient. Without a process group
    (``W = 1``) ``L`` is returned as is.
    """
    if anchors.dim() != 2 or anchors.shape != candidates.shape:
        raise ValueError(
            f"expected anchors and candidates [B, D] of the same shape, got "
            f"{tuple(anchors.shape)} and {tuple(candidates.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    _, world = _world()
    with _full_precision(anchors.device):
        dtype = torch.promote_types(
            torch.promote_types(anchors.dtype, candidates.dtype), torch.float32
        )
        a = gather_batch(F.normalize(anchors.to(dtype), dim=1))
        c = gather_batch(F.normalize(candidates.to(dtype), dim=1))
        logits = a @ c.T / temperature  # [N, N]
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = F.cross_entropy(logits, labels)
        if symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logits.T, labels))
    if world == 1:
        return loss
    return loss + (world - 1) * (loss - loss.detach())


@FEATURE_LOSSES.register("infonce")
class InfoNCEFeatureLoss(nn.Module):
    """In-batch contrastive feature distillation (CRD: Tian, Krishnan & Isola, ICLR 2020).

    Shapes: student ``s`` (after its alignment adapter) and teacher ``t``, each ``[B, C]`` or
    ``[B, C, h, w]`` with the same ``B`` and ``C`` (the spatial sizes may differ: URL's dense
    bottleneck adapter against the teacher's last decoder feature); maps are average-pooled over
    ``h × w`` to ``[B, C]`` first. The student feature of image ``i`` is the anchor, the teacher
    feature of the same image the positive and the teacher features of the other images of the
    (global) batch the negatives: :func:`info_nce` ``(s, t.detach(), temperature)``. CRD draws
    its negatives from a memory bank of 16384 features and scores them with a learned critic;
    here the batch, gathered across processes, supplies them and the critic is the cosine over
    ``temperature``.

    Unlike the other feature losses this one is not 0 for identical inputs: at ``s = t`` it is
    ``mean_i log(1 + Σ_{j≠i} e^{(c_ij − 1)/τ})``, ``c_ij`` the cosines between teacher rows.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        """Return the scalar loss for student ``s`` and teacher ``t`` (teacher is detached)."""
        if s.dim() not in (2, 4) or t.dim() not in (2, 4):
            raise ValueError(
                f"expected features [B, C] or [B, C, h, w], got student {tuple(s.shape)} and "
                f"teacher {tuple(t.shape)}"
            )
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"student and teacher features need the same batch size, got "
                f"{s.shape[0]} and {t.shape[0]}"
            )
        if s.shape[1] != t.shape[1]:
            raise ValueError(
                f"student {tuple(s.shape)} and teacher {tuple(t.shape)} features must have the "
                "same channels (use an alignment adapter)"
            )
        t = t.detach()
        with _full_precision(s.device):
            dtype = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)
            s, t = _pooled(s.to(dtype)), _pooled(t.to(dtype))
        return info_nce(s, t, self.temperature)


def _pooled(x: Tensor) -> Tensor:
    """``[B, C, h, w]`` → ``[B, C]`` (spatial mean); ``[B, C]`` unchanged."""
    return x.mean((2, 3)) if x.dim() == 4 else x
