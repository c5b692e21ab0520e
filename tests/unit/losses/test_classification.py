"""Loss zoo tests: naive references, identities, invariances, gradients, registry errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from unirep.losses import (
    FEATURE_LOSSES,
    PREDICTION_LOSSES,
    TASK_LOSSES,
    CrossEntropyTaskLoss,
    KLDivergenceLoss,
    LinearCKALoss,
    NormalizedL2Loss,
    RBFCKALoss,
)
from unirep.registry import UnknownNameError

CKA_NAMES = ["cka_linear", "cka_rbf"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal(dim: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=_gen(seed), dtype=torch.float64))
    return q.to(dtype)


# ---------------------------------------------------------------------------------------------
# naive references (explicit loops, centering matrix, numpy median)
# ---------------------------------------------------------------------------------------------


def _ref_rows(x: Tensor, normalize: bool) -> np.ndarray:
    rows = x.detach().double().flatten(1).numpy()
    if normalize:
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def _ref_rbf_kernel(x: np.ndarray, sigma_scale: float) -> np.ndarray:
    n = x.shape[0]
    d2 = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            d2[i, j] = np.sum((x[i] - x[j]) ** 2)
    sigma2 = sigma_scale * np.median(d2[d2 != 0])
    return np.exp(-d2 / (2.0 * sigma2))


def _ref_cka(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h)) / (n - 1) ** 2

    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def _ref_cka_loss(s: Tensor, t: Tensor, kind: str, normalize: bool, sigma_scale: float) -> float:
    xs, xt = _ref_rows(s, normalize), _ref_rows(t, normalize)
    if kind == "cka_linear":
        return 1.0 - _ref_cka(xs @ xs.T, xt @ xt.T)
    return 1.0 - _ref_cka(_ref_rbf_kernel(xs, sigma_scale), _ref_rbf_kernel(xt, sigma_scale))


def _ref_l2(s: Tensor, t: Tensor) -> float:
    s, t = s.detach().double(), t.detach().double()
    if s.dim() == 2:
        s, t = s[:, :, None, None], t[:, :, None, None]
    b, _, h, w = t.shape
    total = 0.0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                sv, tv = s[i, :, y, x], t[i, :, y, x]
                total += float(((sv / sv.norm() - tv / tv.norm()) ** 2).sum())
    return total / (b * h * w)


def _ref_kl(s: Tensor, t: Tensor, temperature: float) -> float:
    s, t = s.detach().double(), t.detach().double()
    if s.dim() == 2:
        s, t = s[:, :, None, None], t[:, :, None, None]
    b, k, h, w = s.shape
    total = 0.0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                log_ps = torch.log_softmax(s[i, :, y, x] / temperature, dim=0)
                log_pt = torch.log_softmax(t[i, :, y, x] / temperature, dim=0)
                total += sum(float(log_pt[j].exp() * (log_pt[j] - log_ps[j])) for j in range(k))
    return total / (b * h * w) * temperature**2


def _ref_cross_entropy(logits: Tensor, labels: Tensor, smoothing: float, ignore: int) -> float:
    losses = []
    for row, label in zip(logits.double(), labels.tolist(), strict=True):
        if label == ignore:
            continue
        log_p = torch.log_softmax(row, dim=0)
        nll = -float(log_p[label])
        uniform = -float(log_p.mean())
        losses.append((1.0 - smoothing) * nll + smoothing * uniform)
    return sum(losses) / len(losses)


# ---------------------------------------------------------------------------------------------
# registries
# ---------------------------------------------------------------------------------------------


def test_registries_hold_expected_names() -> None:
    assert FEATURE_LOSSES.names() == ["cka_linear", "cka_rbf", "infonce", "l2"]
    assert PREDICTION_LOSSES.names() == ["dense_l1", "kl"]
    assert TASK_LOSSES.names() == ["cross_entropy", "depth_berhu", "depth_l1", "normal_cosine"]


@pytest.mark.parametrize("registry", [FEATURE_LOSSES, PREDICTION_LOSSES, TASK_LOSSES])
def test_unknown_name_lists_valid_choices(registry) -> None:
    with pytest.raises(UnknownNameError) as info:
        registry.build("does_not_exist")
    message = str(info.value)
    assert "does_not_exist" in message and "valid choices" in message
    for name in registry.names():
        assert name in message


def test_bad_kwargs_fail_at_build() -> None:
    with pytest.raises(TypeError, match="cka_rbf"):
        FEATURE_LOSSES.build("cka_rbf", bandwidth=2.0)
    with pytest.raises(ValueError, match="temperature"):
        PREDICTION_LOSSES.build("kl", temperature=0.0)
    with pytest.raises(ValueError, match="sigma_scale"):
        FEATURE_LOSSES.build("cka_rbf", sigma_scale=-1.0)


# ---------------------------------------------------------------------------------------------
# against the naive references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", CKA_NAMES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(("batch", "s_dim", "t_dim"), [(4, 6, 6), (12, 10, 7)])
def test_cka_matches_reference(name, normalize, dtype, batch, s_dim, t_dim) -> None:
    s = torch.randn(batch, s_dim, generator=_gen(1), dtype=dtype)
    t = s[:, :1] * torch.randn(1, t_dim, generator=_gen(2), dtype=dtype)  # correlated teacher
    t = t + torch.randn(batch, t_dim, generator=_gen(3), dtype=dtype)
    loss = FEATURE_LOSSES.build(name, normalize=normalize)(s, t)
    expected = _ref_cka_loss(s, t, name, normalize, sigma_scale=1.0)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert loss.dtype == dtype
    torch.testing.assert_close(
        loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("sigma_scale", [0.5, 2.0])
def test_cka_rbf_sigma_scale_matches_reference(sigma_scale) -> None:
    s = torch.randn(9, 5, generator=_gen(4), dtype=torch.float64)
    t = torch.randn(9, 3, generator=_gen(5), dtype=torch.float64)
    loss = RBFCKALoss(sigma_scale=sigma_scale)(s, t)
    expected = _ref_cka_loss(s, t, "cka_rbf", normalize=True, sigma_scale=sigma_scale)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


def test_cka_flattens_extra_dims() -> None:
    s = torch.randn(5, 3, 2, 2, generator=_gen(6), dtype=torch.float64)
    t = torch.randn(5, 4, 2, 2, generator=_gen(7), dtype=torch.float64)
    for name in CKA_NAMES:
        loss = FEATURE_LOSSES.build(name)
        torch.testing.assert_close(loss(s, t), loss(s.flatten(1), t.flatten(1)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("s_shape", "t_shape"),
    [((4, 6), (4, 6)), ((2, 5, 3, 4), (2, 5, 3, 4))],
)
def test_l2_matches_reference(dtype, s_shape, t_shape) -> None:
    s = torch.randn(*s_shape, generator=_gen(8), dtype=dtype)
    t = torch.randn(*t_shape, generator=_gen(9), dtype=dtype)
    loss = NormalizedL2Loss()(s, t)
    expected = torch.tensor(_ref_l2(s, t), dtype=dtype)
    torch.testing.assert_close(loss, expected)


def test_l2_resizes_student_to_teacher_map() -> None:
    s = torch.randn(2, 4, 3, 5, generator=_gen(10), dtype=torch.float64)
    t = torch.randn(2, 4, 6, 10, generator=_gen(11), dtype=torch.float64)
    resized = F.interpolate(s, size=(6, 10), mode="bilinear", align_corners=False)
    loss = NormalizedL2Loss()(s, t)
    torch.testing.assert_close(loss, torch.tensor(_ref_l2(resized, t), dtype=torch.float64))


def test_l2_rejects_channel_mismatch() -> None:
    with pytest.raises(ValueError, match="channels"):
        NormalizedL2Loss()(torch.randn(3, 4), torch.randn(3, 5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 8.0])
@pytest.mark.parametrize("shape", [(5, 7), (2, 4, 3, 2)])
def test_kl_matches_reference(dtype, temperature, shape) -> None:
    s = 3.0 * torch.randn(*shape, generator=_gen(12), dtype=dtype)
    t = 3.0 * torch.randn(*shape, generator=_gen(13), dtype=dtype)
    loss = PREDICTION_LOSSES.build("kl", temperature=temperature)(s, t)
    expected = torch.tensor(_ref_kl(s, t, temperature), dtype=dtype)
    torch.testing.assert_close(loss, expected)


def test_kl_default_temperature_is_four() -> None:
    assert KLDivergenceLoss().temperature == 4.0


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_reference(smoothing) -> None:
    logits = torch.randn(8, 5, generator=_gen(14), dtype=torch.float64)
    labels = torch.tensor([0, 4, -1, 2, 2, -1, 1, 3])
    loss = TASK_LOSSES.build("cross_entropy", label_smoothing=smoothing)(logits, labels)
    expected = _ref_cross_entropy(logits, labels, smoothing, ignore=-1)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


def test_cross_entropy_dense_and_custom_ignore_index() -> None:
    logits = torch.randn(2, 4, 3, 3, generator=_gen(15))
    labels = torch.randint(0, 4, (2, 3, 3), generator=_gen(16))
    labels[0, 0, 0] = 255
    loss = CrossEntropyTaskLoss(ignore_index=255)(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, ignore_index=255))


def test_cross_entropy_all_ignored_is_zero_with_graph() -> None:
    logits = torch.randn(3, 4, requires_grad=True)
    loss = CrossEntropyTaskLoss()(logits, torch.full((3,), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ---------------------------------------------------------------------------------------------
# properties every distillation loss must have
# ---------------------------------------------------------------------------------------------

ALL_DISTILL = [(FEATURE_LOSSES, n) for n in FEATURE_LOSSES] + [
    (PREDICTION_LOSSES, n) for n in PREDICTION_LOSSES
]
ALL_DISTILL_IDS = [name for _, name in ALL_DISTILL]


# a contrastive loss is not zero for identical inputs: the other images stay negatives
MATCHING = [(r, n) for r, n in ALL_DISTILL if n != "infonce"]


@pytest.mark.parametrize(("registry", "name"), MATCHING, ids=[n for _, n in MATCHING])
@pytest.mark.parametrize("shape", [(4, 8), (16, 8), (4, 8, 3, 3)])
def test_zero_on_identical_inputs(registry, name, shape) -> None:
    x = torch.randn(*shape, generator=_gen(17))
    loss = registry.build(name)(x, x.clone())
    assert loss.dim() == 0
    assert abs(loss.item()) < 1e-5


@pytest.mark.parametrize("shape", [(4, 8), (16, 8), (4, 8, 3, 3)])
def test_infonce_is_lowest_for_identical_inputs(shape) -> None:
    x = torch.randn(*shape, generator=_gen(17))
    loss = FEATURE_LOSSES.build("infonce")
    other = torch.randn(*shape, generator=_gen(18))
    assert loss(x, x.clone()).item() < loss(x, other).item()


@pytest.mark.parametrize(("registry", "name"), ALL_DISTILL, ids=ALL_DISTILL_IDS)
@pytest.mark.parametrize("case", ["random", "student_constant", "both_constant", "zeros"])
def test_finite_for_small_and_degenerate_batches(registry, name, case) -> None:
    s = torch.randn(4, 6, generator=_gen(18))
    t = torch.randn(4, 6, generator=_gen(19))
    if case in ("student_constant", "both_constant"):
        s = torch.full((4, 6), 0.3).requires_grad_()
    if case == "both_constant":
        t = torch.full((4, 6), -1.7)
    if case == "zeros":
        s, t = torch.zeros(4, 6), torch.zeros(4, 6)
    s.requires_grad_()
    loss = registry.build(name)(s, t)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", CKA_NAMES)
@pytest.mark.parametrize("normalize", [True, False])
def test_cka_is_one_for_constant_features(name, normalize) -> None:
    # A constant batch has a constant (hence zero after centring) kernel: CKA is defined as 0.
    s = torch.full((4, 6), 0.3)
    t = torch.randn(4, 5, generator=_gen(20))
    loss = FEATURE_LOSSES.build(name, normalize=normalize)(s, t)
    torch.testing.assert_close(loss, torch.tensor(1.0))


@pytest.mark.parametrize(("registry", "name"), ALL_DISTILL, ids=ALL_DISTILL_IDS)
def test_gradient_reaches_student_not_teacher(registry, name) -> None:
    s = torch.randn(6, 5, generator=_gen(21), requires_grad=True)
    t = torch.randn(6, 5, generator=_gen(22), requires_grad=True)
    registry.build(name)(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize(("registry", "name"), ALL_DISTILL, ids=ALL_DISTILL_IDS)
def test_gradient_reaches_every_student_parameter(registry, name) -> None:
    student = torch.nn.Linear(7, 5)
    teacher = torch.nn.Linear(7, 5).requires_grad_(False)
    x = torch.randn(8, 7, generator=_gen(23))
    registry.build(name)(student(x), teacher(x)).backward()
    for param in student.parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0


@pytest.mark.parametrize(("registry", "name"), ALL_DISTILL, ids=ALL_DISTILL_IDS)
def test_full_precision_under_autocast(registry, name) -> None:
    s = torch.randn(8, 6, generator=_gen(24))
    t = torch.randn(8, 6, generator=_gen(25))
    loss_fn = registry.build(name)
    expected = loss_fn(s.bfloat16().float(), t.bfloat16().float())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = loss_fn(s.bfloat16(), t.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(("registry", "name"), ALL_DISTILL, ids=ALL_DISTILL_IDS)
def test_rejects_batch_mismatch(registry, name) -> None:
    with pytest.raises(ValueError, match="batch"):
        registry.build(name)(torch.randn(4, 6), torch.randn(5, 6))


# ---------------------------------------------------------------------------------------------
# CKA invariances
# ---------------------------------------------------------------------------------------------


def _cka_pair(seed: int) -> tuple[Tensor, Tensor]:
    s = torch.randn(10, 6, generator=_gen(seed), dtype=torch.float64)
    t = torch.tanh(s @ torch.randn(6, 4, generator=_gen(seed + 1), dtype=torch.float64))
    return s, t + 0.3 * torch.randn(10, 4, generator=_gen(seed + 2), dtype=torch.float64)


# Right-multiplying by an orthogonal matrix keeps row norms and pairwise distances, so both
# kernels (and the row normalisation) are unchanged.
@pytest.mark.parametrize("name", CKA_NAMES)
@pytest.mark.parametrize("normalize", [True, False])
def test_cka_invariant_to_orthogonal_transforms(name, normalize) -> None:
    s, t = _cka_pair(26)
    loss_fn = FEATURE_LOSSES.build(name, normalize=normalize)
    base = loss_fn(s, t)
    torch.testing.assert_close(loss_fn(s @ _orthogonal(6, seed=1), t), base)
    torch.testing.assert_close(loss_fn(s, t @ _orthogonal(4, seed=2)), base)
    assert 0.0 < base.item() < 1.0


# Isotropic scaling: the linear kernel scales by c² (cancels in CKA); the median bandwidth scales
# with the distances, so the RBF kernel is unchanged; row normalisation removes c altogether.
@pytest.mark.parametrize("name", CKA_NAMES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0])
def test_cka_invariant_to_isotropic_scaling(name, normalize, scale) -> None:
    s, t = _cka_pair(29)
    loss_fn = FEATURE_LOSSES.build(name, normalize=normalize)
    base = loss_fn(s, t)
    torch.testing.assert_close(loss_fn(scale * s, t), base)
    torch.testing.assert_close(loss_fn(s, scale * t), base)


def test_cka_symmetric_and_bounded() -> None:
    s, t = _cka_pair(32)
    for loss_fn in (LinearCKALoss(), RBFCKALoss()):
        torch.testing.assert_close(loss_fn(s, t), loss_fn(t, s))
        assert 0.0 <= loss_fn(s, t).item() <= 1.0


# Centring makes CKA blind to a shared offset when rows are not normalised; a large offset in
# float32 also checks that the kernels are built from centred features (no cancellation).
@pytest.mark.parametrize("name", CKA_NAMES)
def test_cka_invariant_to_common_offset_in_float32(name) -> None:
    s, t = _cka_pair(35)
    loss_fn = FEATURE_LOSSES.build(name, normalize=False)
    base = loss_fn(s, t)
    shifted = loss_fn((s + 1000.0).float(), (t - 500.0).float())
    torch.testing.assert_close(shifted.double(), base, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CKA_NAMES)
def test_cka_treats_roundoff_noise_as_constant(name) -> None:
    base = torch.full((6, 5), 0.7)
    s = base * (1.0 + 1e-9 * torch.randn(6, 5, generator=_gen(38)))  # below float32 resolution
    s = s + torch.finfo(torch.float32).eps * torch.randn(6, 5, generator=_gen(39)).sign() * 0.7
    t = torch.randn(6, 4, generator=_gen(40))
    for normalize in (True, False):
        loss = FEATURE_LOSSES.build(name, normalize=normalize)(s, t)
        torch.testing.assert_close(loss, torch.tensor(1.0))


def test_cka_rbf_duplicate_rows_match_reference() -> None:
    s = torch.randn(6, 5, generator=_gen(41), dtype=torch.float64)
    s = torch.cat([s, s[:3]])  # duplicates: their zero distances are left out of the median
    t = torch.randn(9, 4, generator=_gen(42), dtype=torch.float64)
    loss = RBFCKALoss(normalize=False)(s, t)
    expected = _ref_cka_loss(s, t, "cka_rbf", normalize=False, sigma_scale=1.0)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("registry", "name"), ALL_DISTILL, ids=ALL_DISTILL_IDS)
def test_cuda_matches_cpu(registry, name) -> None:
    s = torch.randn(8, 6, generator=_gen(43))
    t = torch.randn(8, 6, generator=_gen(44))
    loss_fn = registry.build(name)
    s_cuda = s.cuda().requires_grad_()
    with torch.autocast(device_type="cuda", dtype=torch.float16):
        loss = loss_fn(s_cuda, t.cuda())
    loss.backward()
    assert loss.device.type == "cuda" and loss.dtype == torch.float32
    torch.testing.assert_close(loss.cpu(), loss_fn(s, t), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(s_cuda.grad).all()
