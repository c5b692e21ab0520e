"""Dense loss tests: naive per-pixel references, identities, masking, gradients, registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import unirep.losses.dense  # noqa: F401  (registers the dense losses)
from unirep.losses.distillation import PREDICTION_LOSSES
from unirep.losses.task import TASK_LOSSES

DEPTH_NAMES = ["depth_l1", "depth_berhu"]
TASK_NAMES = [*DEPTH_NAMES, "normal_cosine"]
B, H, W = 2, 5, 6


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _depth_data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Prediction, target with about a third of pixels invalid (0), and the validity mask."""
    g = _gen(seed)
    pred = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64) * 5
    target = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64) * 5 + 0.1
    valid = torch.rand(B, 1, H, W, generator=g) > 0.33
    return pred, torch.where(valid, target, torch.zeros_like(target)), valid


def _normal_data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Unnormalised prediction, unit target with all-zero invalid pixels, and the mask."""
    g = _gen(seed)
    pred = torch.randn(B, 3, H, W, generator=g, dtype=torch.float64) * 3
    target = torch.nn.functional.normalize(
        torch.randn(B, 3, H, W, generator=g, dtype=torch.float64), dim=1
    )
    valid = torch.rand(B, 1, H, W, generator=g) > 0.33
    return pred, torch.where(valid, target, torch.zeros_like(target)), valid


def _data(name: str, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    return _normal_data(seed) if name == "normal_cosine" else _depth_data(seed)


# ---------------------------------------------------------------------------------------------
# naive references: explicit loops over pixels
# ---------------------------------------------------------------------------------------------


def _pixels(target: Tensor) -> list[tuple[int, int, int]]:
    return [(b, i, j) for b in range(target.shape[0]) for i in range(H) for j in range(W)]


def _ref_depth_l1(pred: Tensor, target: Tensor) -> float:
    errors = [
        abs(pred[b, 0, i, j].item() - target[b, 0, i, j].item())
        for b, i, j in _pixels(target)
        if target[b, 0, i, j].item() != 0.0
    ]
    return sum(errors) / len(errors)


def _ref_berhu(pred: Tensor, target: Tensor, threshold: float = 0.2) -> float:
    residuals = [
        abs(pred[b, 0, i, j].item() - target[b, 0, i, j].item())
        for b, i, j in _pixels(target)
        if target[b, 0, i, j].item() != 0.0
    ]
    c = threshold * max(residuals)
    terms = [r if r <= c else (r * r + c * c) / (2 * c) for r in residuals]
    return sum(terms) / len(terms)


def _ref_normal_cosine(pred: Tensor, target: Tensor) -> float:
    terms = []
    for b, i, j in _pixels(target):
        p, t = pred[b, :, i, j].tolist(), target[b, :, i, j].tolist()
        if all(v == 0.0 for v in t):
            continue
        dot = sum(x * y for x, y in zip(p, t, strict=True))
        norm_p = math.sqrt(sum(x * x for x in p))
        norm_t = math.sqrt(sum(y * y for y in t))
        terms.append(1.0 - dot / (norm_p * norm_t))
    return sum(terms) / len(terms)


def _ref_dense_l1(s: Tensor, t: Tensor, normalize: bool) -> float:
    total = 0.0
    for b, i, j in _pixels(t):
        sv, tv = s[b, :, i, j].tolist(), t[b, :, i, j].tolist()
        if normalize:
            ns, nt = math.sqrt(sum(x * x for x in sv)), math.sqrt(sum(y * y for y in tv))
            sv, tv = [x / ns for x in sv], [y / nt for y in tv]
        total += sum(abs(x - y) for x, y in zip(sv, tv, strict=True))
    return total / (t.shape[0] * H * W)


REFERENCES = {
    "depth_l1": _ref_depth_l1,
    "depth_berhu": _ref_berhu,
    "normal_cosine": _ref_normal_cosine,
}


# ---------------------------------------------------------------------------------------------
# task losses
# ---------------------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert set(TASK_NAMES) <= set(TASK_LOSSES.names())
    assert "cross_entropy" in TASK_LOSSES  # registered into the existing zoo, not a new one
    assert "dense_l1" in PREDICTION_LOSSES
    assert "kl" in PREDICTION_LOSSES


@pytest.mark.parametrize("name", TASK_NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_reference(name: str, seed: int) -> None:
    pred, target, _ = _data(name, seed)
    loss = TASK_LOSSES.build(name)(pred, target)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(REFERENCES[name](pred, target), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name", DEPTH_NAMES)
def test_depth_accepts_target_without_channel(name: str) -> None:
    pred, target, _ = _depth_data()
    loss = TASK_LOSSES.build(name)
    torch.testing.assert_close(loss(pred, target[:, 0]), loss(pred, target))


def test_depth_custom_invalid_value() -> None:
    pred, target, valid = _depth_data()
    shifted = torch.where(valid, target, torch.full_like(target, -1.0))
    loss = TASK_LOSSES.build("depth_l1", invalid_value=-1.0)(pred, shifted)
    assert loss.item() == pytest.approx(_ref_depth_l1(pred, target), rel=1e-10)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_zero_on_identical_inputs(name: str) -> None:
    _, target, _ = _data(name)
    loss = TASK_LOSSES.build(name)
    assert loss(target.clone(), target).item() == pytest.approx(0.0, abs=1e-12)


def test_normal_cosine_ignores_prediction_scale() -> None:
    pred, target, _ = _normal_data()
    loss = TASK_LOSSES.build("normal_cosine")
    assert loss(7.5 * target, target).item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(loss(0.01 * pred, target), loss(pred, target))
    assert loss(-target, target).item() == pytest.approx(2.0)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_invalid_pixels_have_no_effect(name: str) -> None:
    pred, target, valid = _data(name)
    garbage = 1e3 * torch.randn(pred.shape, generator=_gen(9), dtype=pred.dtype)
    garbage.view(-1)[0::5] = float("nan")
    garbage.view(-1)[1::5] = float("inf")
    changed = torch.where(valid, pred, garbage)  # even non-finite values are ignored
    loss = TASK_LOSSES.build(name)
    torch.testing.assert_close(loss(changed, target), loss(pred, target))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_gradient_reaches_valid_pixels_only(name: str) -> None:
    pred, target, valid = _data(name)
    pred.requires_grad_(True)
    TASK_LOSSES.build(name)(pred, target).backward()
    grad = pred.grad
    assert grad is not None and torch.isfinite(grad).all()
    mask = valid.expand_as(grad)
    assert (grad[~mask] == 0).all()
    assert grad[mask].abs().sum() > 0


@pytest.mark.parametrize("name", TASK_NAMES)
def test_no_valid_pixel_gives_zero_in_graph(name: str) -> None:
    pred, target, _ = _data(name)
    pred.requires_grad_(True)
    loss = TASK_LOSSES.build(name)(pred, torch.zeros_like(target))
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert pred.grad is not None and (pred.grad == 0).all()


def test_normal_cosine_zero_prediction_is_finite() -> None:
    _, target, _ = _normal_data()
    pred = torch.zeros_like(target, requires_grad=True)
    loss = TASK_LOSSES.build("normal_cosine")(pred, target)
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    assert torch.isfinite(pred.grad).all()


def test_berhu_regimes() -> None:
    target = torch.ones(1, 1, 1, 3, dtype=torch.float64)
    pred = target + torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64).view(1, 1, 1, 3)
    c = 0.2 * 10.0
    expected = (0.1 + 1.0 + (100.0 + c * c) / (2 * c)) / 3
    assert TASK_LOSSES.build("depth_berhu")(pred, target).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="threshold"):
        TASK_LOSSES.build("depth_berhu", threshold=0.0)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_float32_and_half_inputs(name: str) -> None:
    pred, target, _ = _data(name)
    expected = REFERENCES[name](pred, target)
    loss = TASK_LOSSES.build(name)
    assert loss(pred.float(), target.float()).dtype == torch.float32
    assert loss(pred.float(), target.float()).item() == pytest.approx(expected, rel=1e-5)
    assert loss(pred.half(), target.half()).dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "pred_shape", "target_shape"),
    [
        ("depth_l1", (B, 2, H, W), (B, 2, H, W)),
        ("depth_l1", (B, 1, H, W), (B, 1, H, W + 1)),
        ("normal_cosine", (B, 1, H, W), (B, 1, H, W)),
        ("normal_cosine", (B, 3, H, W), (B, H, W, 3)),
    ],
)
def test_bad_shapes_are_rejected(
    name: str, pred_shape: tuple[int, ...], target_shape: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match="expected"):
        TASK_LOSSES.build(name)(torch.zeros(pred_shape), torch.zeros(target_shape))


# ---------------------------------------------------------------------------------------------
# dense prediction distillation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "normalize"), [(1, False), (3, False), (3, True)])
def test_dense_l1_matches_naive_reference(channels: int, normalize: bool) -> None:
    g = _gen(3)
    s = torch.randn(B, channels, H, W, generator=g, dtype=torch.float64)
    t = torch.randn(B, channels, H, W, generator=g, dtype=torch.float64)
    loss = PREDICTION_LOSSES.build("dense_l1", normalize_channels=normalize)(s, t)
    assert loss.item() == pytest.approx(_ref_dense_l1(s, t, normalize), rel=1e-10)


def test_dense_l1_identity_and_scale() -> None:
    t = torch.randn(B, 3, H, W, generator=_gen(4))
    assert PREDICTION_LOSSES.build("dense_l1")(t.clone(), t).item() == 0.0
    normalized = PREDICTION_LOSSES.build("dense_l1", normalize_channels=True)
    assert normalized(4.0 * t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert PREDICTION_LOSSES.build("dense_l1")(4.0 * t, t).item() > 0


@pytest.mark.parametrize("normalize", [False, True])
def test_dense_l1_gradient_reaches_student_only(normalize: bool) -> None:
    g = _gen(5)
    s = torch.randn(B, 3, H, W, generator=g, requires_grad=True)
    t = torch.randn(B, 3, H, W, generator=g, requires_grad=True)
    loss = PREDICTION_LOSSES.build("dense_l1", normalize_channels=normalize)(s, t)
    assert not loss.isnan()
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_dense_l1_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="must match"):
        PREDICTION_LOSSES.build("dense_l1")(torch.zeros(B, 3, H, W), torch.zeros(B, 1, H, W))
