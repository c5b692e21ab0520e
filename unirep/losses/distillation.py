"""Distillation losses: match the student to a frozen teacher.

Two zoos, both keyed by short names and built with ``REGISTRY.build(name, **kwargs)``:

* :data:`FEATURE_LOSSES` compare a student feature (usually after its alignment adapter) with the
  teacher's feature: ``"l2"``, ``"cka_linear"``, ``"cka_rbf"``.
* :data:`PREDICTION_LOSSES` compare student and teacher logits: ``"kl"``.

Every loss is an ``nn.Module`` whose ``forward(s, t)`` takes the student tensor first and the
teacher tensor second and returns a scalar. The teacher tensor is detached inside the loss, so
gradient only ever reaches the student. Losses compute in float32 (float64 inputs stay float64),
with autocast switched off, because normalisation, kernels and softmax ratios lose too much in
half precision.

Reference: Li, Liu & Bilen, "Universal Representations: A Unified Look at Multiple Task and
Domain Learning", IJCV 2023 (arXiv 2204.02744); the L2 loss is from its ECCV-W 2020 predecessor
"Knowledge Distillation for Multi-task Learning" (KD4MTL).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.registry import Registry

__all__ = [
    "FEATURE_LOSSES",
    "PREDICTION_LOSSES",
    "KLDivergenceLoss",
    "LinearCKALoss",
    "NormalizedL2Loss",
    "RBFCKALoss",
    "linear_cka",
    "rbf_cka",
]

FEATURE_LOSSES: Registry[nn.Module] = Registry("feature distillation loss")
PREDICTION_LOSSES: Registry[nn.Module] = Registry("prediction distillation loss")


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _full_precision(device: torch.device) -> Iterator[None]:
    """Switch autocast off for ``device`` (a no-op where autocast does not exist)."""
    try:
        ctx = torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # device types without autocast support
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def _upcast(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Detach the teacher and bring both tensors to a common dtype of at least float32."""
    dtype = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)
    return s.to(dtype), t.detach().to(dtype)


def _check_batch(s: Tensor, t: Tensor, min_dim: int, same_shape: str | None = None) -> None:
    """Shape checks shared by the losses; ``same_shape`` names what must match exactly."""
    if s.dim() < min_dim or t.dim() < min_dim:
        raise ValueError(
            f"expected tensors with at least {min_dim} dims, got student {tuple(s.shape)} "
            f"and teacher {tuple(t.shape)}"
        )
    if s.shape[0] != t.shape[0]:
        raise ValueError(
            f"student and teacher batch sizes differ: {tuple(s.shape)} vs {tuple(t.shape)}"
        )
    if same_shape is not None and s.shape != t.shape:
        raise ValueError(
            f"student {tuple(s.shape)} and teacher {tuple(t.shape)} {same_shape} must match"
        )


# ---------------------------------------------------------------------------------------------
# channel-normalised L2
# ---------------------------------------------------------------------------------------------


@FEATURE_LOSSES.register("l2")
class NormalizedL2Loss(nn.Module):
    """Squared distance between channel-wise L2-normalised features (KD4MTL; URL on NYU-v2).

    Shapes: student and teacher ``[B, C]`` or ``[B, C, H, W]`` with the same ``C``. For maps whose
    spatial sizes differ, the student map is bilinearly resized to the teacher's ``H×W`` first.

    Both features are L2-normalised along the channel dimension (dim 1); the squared difference is
    summed over channels and averaged over the batch and all spatial positions, i.e.
    ``mean_{b,h,w} ‖ŝ[b,:,h,w] − t̂[b,:,h,w]‖²``. The value lies in ``[0, 4]``; it is 0 for
    identical features and a zero feature vector normalises to zero rather than NaN.
    """

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        """Return the scalar loss for student ``s`` and teacher ``t`` (teacher is detached)."""
        _check_batch(s, t, min_dim=2)
        with _full_precision(s.device):
            s, t = _upcast(s, t)
            if s.dim() == 4 and t.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            if s.shape != t.shape:
                raise ValueError(
                    f"student {tuple(s.shape)} and teacher {tuple(t.shape)} features must have "
                    "the same channels (use an alignment adapter) and spatial layout"
                )
            s = F.normalize(s, dim=1, eps=self.eps)
            t = F.normalize(t, dim=1, eps=self.eps)
            return (s - t).pow(2).sum(dim=1).mean()


# ---------------------------------------------------------------------------------------------
# centred kernel alignment
# ---------------------------------------------------------------------------------------------


# Centred quantities smaller than this many machine epsilons, relative to the uncentred ones, are
# round-off: as far as the dtype can tell, the batch is constant.
_ROUNDOFF_RTOL = 100.0


def _center(k: Tensor) -> Tensor:
    """``H K H`` with ``H = I − 11ᵀ/n``, written as mean subtraction (no n×n matrix, any device)."""
    return k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()


def _centred_rows(x: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """Flatten ``[B, ...]`` to ``[B, D]``, optionally L2-normalise rows, subtract the batch mean.

    Centring the features before forming a kernel avoids the cancellation of ``H(XXᵀ)H`` when the
    features share a large common component. Also returns whether the rows vary at all (a boolean
    scalar tensor), judged relative to their uncentred size so the test is scale-free.
    """
    x = x.flatten(start_dim=1)
    if normalize:
        x = F.normalize(x, dim=1)
    xc = x - x.mean(dim=0, keepdim=True)
    rtol = _ROUNDOFF_RTOL * torch.finfo(x.dtype).eps
    varies = torch.linalg.vector_norm(xc.detach()) > rtol * torch.linalg.vector_norm(x.detach())
    return xc, varies


def _cka_from_centred(kc: Tensor, lc: Tensor, informative: Tensor) -> Tensor:
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K)·HSIC(L, L)) from centred kernels ``HKH, HLH`` ``[n, n]``.

    HSIC's ``1/(n−1)²`` factor cancels, and ``tr(KHLH) = ⟨HKH, HLH⟩_F`` because ``H`` is a
    symmetric projection, so CKA is the cosine between the centred kernels.

    Where a kernel is constant (``informative`` is False, e.g. every row of a batch equal) it
    centres to zero and CKA is 0/0. Such a kernel carries no similarity structure, so CKA is
    defined as 0 there. Deciding this with a relative test instead of an absolute eps keeps CKA
    exactly invariant to rescaling the features; value and gradient are finite in every case.
    """
    norm_k, norm_l = torch.linalg.vector_norm(kc), torch.linalg.vector_norm(lc)
    one = torch.ones_like(norm_k)
    # Divide by 1 on the degenerate branch, so neither branch (nor its gradient) produces NaN.
    cosine = (
        (kc * lc).sum()
        / torch.where(informative, norm_k, one)
        / torch.where(informative, norm_l, one)
    )
    return torch.where(informative, cosine, torch.zeros_like(cosine))


def _pairwise_sq_dists(x: Tensor) -> Tensor:
    """Squared Euclidean distances between the rows of ``x`` ``[n, D]`` → ``[n, n]``.

    Uses the Gram matrix (``O(n²)`` memory rather than ``O(n²D)``). Taking the squared norms from
    the Gram diagonal makes the diagonal exactly zero; round-off below zero is clamped.
    """
    gram = x @ x.T
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0)


def _median_bandwidth(d2: Tensor, sigma_scale: float) -> Tensor:
    """``σ² = sigma_scale · median`` of the nonzero pairwise squared distances in ``d2``.

    Distances at round-off level (relative to the largest one) count as zero, so duplicate rows are
    excluded as in the reference even when the Gram formula leaves them slightly positive. If every
    distance is zero (all rows equal) the kernel is constant whatever σ is, and σ² = 1 is used.
    The median averages the two middle values, like numpy (``torch.median`` takes the lower one).
    """
    d2 = d2.detach()
    tol = _ROUNDOFF_RTOL * torch.finfo(d2.dtype).eps * d2.max()
    nonzero = d2[d2 > tol].sort().values
    n = nonzero.numel()
    if n == 0:
        return torch.ones((), dtype=d2.dtype, device=d2.device)
    return sigma_scale * 0.5 * (nonzero[(n - 1) // 2] + nonzero[n // 2])


def linear_cka(x: Tensor, y: Tensor, normalize: bool = True) -> Tensor:
    """Linear-kernel CKA (Kornblith et al., ICML 2019) between two batches of features.

    Shapes: ``x`` ``[B, Dx, ...]`` and ``y`` ``[B, Dy, ...]``; extra dims are flattened, so
    ``Dx`` and ``Dy`` may differ. With ``normalize`` rows are L2-normalised first. Reduces over the
    whole batch to a scalar in ``[0, 1]``; 0 if either batch is constant.
    """
    xc, x_varies = _centred_rows(x, normalize)
    yc, y_varies = _centred_rows(y, normalize)
    # With centred features, XcXcᵀ already equals HXXᵀH.
    return _cka_from_centred(xc @ xc.T, yc @ yc.T, x_varies & y_varies)


def _centred_rbf_kernel(x: Tensor, normalize: bool, sigma_scale: float) -> tuple[Tensor, Tensor]:
    """Centred RBF kernel of the rows of ``x`` and whether it is informative (non-constant)."""
    xc, varies = _centred_rows(x, normalize)  # distances do not change under translation
    d2 = _pairwise_sq_dists(xc)
    kernel = torch.exp(-d2 / (2.0 * _median_bandwidth(d2, sigma_scale)))
    kc = _center(kernel)
    rtol = _ROUNDOFF_RTOL * torch.finfo(kernel.dtype).eps
    informative = varies & (
        torch.linalg.vector_norm(kc.detach()) > rtol * torch.linalg.vector_norm(kernel.detach())
    )
    return kc, informative


def rbf_cka(x: Tensor, y: Tensor, normalize: bool = True, sigma_scale: float = 1.0) -> Tensor:
    """RBF-kernel CKA with a median-heuristic bandwidth per input (as URL's ``kernel_CKA``).

    The kernel is ``exp(−d²/(2σ²))`` with ``σ² = sigma_scale · median(nonzero d²)`` computed
    separately for ``x`` and ``y`` (and treated as a constant for the gradient). Shapes as for
    :func:`linear_cka`; returns a scalar in ``[0, 1]``, 0 if either batch is constant.
    """
    kc, x_informative = _centred_rbf_kernel(x, normalize, sigma_scale)
    lc, y_informative = _centred_rbf_kernel(y, normalize, sigma_scale)
    return _cka_from_centred(kc, lc, x_informative & y_informative)


class _CKALoss(nn.Module, abc.ABC):
    """Shared plumbing for the CKA losses: checks, detaching, float32, ``1 − CKA``."""

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize

    @abc.abstractmethod
    def _cka(self, s: Tensor, t: Tensor) -> Tensor:
        """CKA of the two batches (a scalar in [0, 1])."""

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        """Return ``1 − CKA(s, t)`` for student ``s`` and teacher ``t`` (teacher is detached)."""
        _check_batch(s, t, min_dim=2)
        with _full_precision(s.device):
            s, t = _upcast(s, t)
            return 1.0 - self._cka(s, t)


@FEATURE_LOSSES.register("cka_linear")
class LinearCKALoss(_CKALoss):
    """``1 − linear CKA`` between student and teacher batches (Kornblith et al., ICML 2019).

    Shapes: student ``[B, Cs, ...]``, teacher ``[B, Ct, ...]``; extra dims are flattened and
    ``Cs`` may differ from ``Ct``. The comparison is between the two ``B×B`` Gram matrices, so the
    loss reduces over the whole batch (it is not a mean of per-sample terms) and lies in
    ``[0, 1]``. With ``normalize=True`` (as URL) rows are L2-normalised first. A constant feature
    batch has a zero centred Gram matrix; the loss is then 1 rather than NaN.

    Used as an alternative distillation loss in the URL code (``linearcka``).
    """

    def _cka(self, s: Tensor, t: Tensor) -> Tensor:
        return linear_cka(s, t, normalize=self.normalize)


@FEATURE_LOSSES.register("cka_rbf")
class RBFCKALoss(_CKALoss):
    """``1 − RBF-kernel CKA`` between student and teacher batches (URL, IJCV 2023).

    This is URL's feature loss on Visual Decathlon and Meta-Dataset. Shapes and reduction as
    :class:`LinearCKALoss`. Each side's kernel is ``exp(−d²/(2σ²))`` over pairwise squared
    distances ``d²`` of its (optionally L2-normalised) rows, with ``σ² = sigma_scale · median of
    the nonzero d²`` (the reference's ``σ = sqrt(median)`` for ``sigma_scale=1``). The bandwidth is
    a constant for the gradient. If all rows are equal the kernel is constant and the loss is 1.
    """

    def __init__(self, normalize: bool = True, sigma_scale: float = 1.0) -> None:
        super().__init__(normalize=normalize)
        if sigma_scale <= 0:
            raise ValueError(f"sigma_scale must be positive, got {sigma_scale}")
        self.sigma_scale = sigma_scale

    def _cka(self, s: Tensor, t: Tensor) -> Tensor:
        return rbf_cka(s, t, normalize=self.normalize, sigma_scale=self.sigma_scale)


# ---------------------------------------------------------------------------------------------
# prediction distillation
# ---------------------------------------------------------------------------------------------


@PREDICTION_LOSSES.register("kl")
class KLDivergenceLoss(nn.Module):
    """Temperature-scaled KL from teacher to student predictions (Hinton et al. 2015; URL).

    ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` with the KL summed over classes (dim 1) and averaged
    over the batch ("batchmean"). Shapes: logits ``[B, K]``, or ``[B, K, H, W]`` for dense
    prediction, where the KL is averaged over pixels as well as the batch. The ``T²`` factor keeps
    gradient magnitudes comparable across temperatures. URL uses ``T = 4`` on Meta-Dataset and
    ``T = 8`` on Visual Decathlon.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        """Return the scalar loss for student logits ``s`` and teacher logits ``t``."""
        _check_batch(s, t, min_dim=2, same_shape="logits")
        with _full_precision(s.device):
            s, t = _upcast(s, t)
            temp = self.temperature
            log_p_s = F.log_softmax(s / temp, dim=1)
            log_p_t = F.log_softmax(t / temp, dim=1)
            kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=1)
            return kl.mean() * temp**2
