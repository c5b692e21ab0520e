"""Dense metrics against hand-computed values on tiny images, and split-level accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from unirep.metrics.classification import METRIC_HIGHER_IS_BETTER
from unirep.metrics.dense import DepthMeter, NormalMeter, SegmentationMeter

# --------------------------------------------------------------------------------------------
# SegmentationMeter
# --------------------------------------------------------------------------------------------

# One 2×3 image, 3 classes; the last pixel is unlabelled (-1).
SEG_TARGET = torch.tensor([[[0, 0, 1], [1, 2, -1]]])
SEG_PRED = torch.tensor([[[0, 1, 1], [1, 1, 2]]])
# Valid (target, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,1).
# Confusion rows = target: [1 1 0] / [0 2 0] / [0 1 0]; TP = [1, 2, 0].
# Union = row + col − TP = [2+1−1, 2+4−2, 1+0−0] = [2, 4, 1] -> IoU = [1/2, 1/2, 0].
SEG_MIOU = (0.5 + 0.5 + 0.0) / 3
SEG_PIXEL_ACC = 3 / 5


def _one_hot_logits(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, num_classes).permute(0, 3, 1, 2).float()


def _naive_miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Class-by-class counting with Python loops: the reference for the vectorised meter."""
    ious = []
    for c in range(num_classes):
        tp = fp = fn = 0
        for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
            if not 0 <= t < num_classes:
                continue
            tp += p == c and t == c
            fp += p == c and t != c
            fn += p != c and t == c
        if tp + fp + fn > 0:
            ious.append(tp / (tp + fp + fn))
    return sum(ious) / len(ious)


def test_segmentation_hand_computed_from_predictions() -> None:
    meter = SegmentationMeter(num_classes=3)
    meter.update(SEG_PRED, SEG_TARGET)
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [0, 1, 0]])
    assert torch.equal(meter.confusion, expected)
    assert meter.confusion.dtype == torch.int64
    assert meter.count == 5
    result = meter.compute()
    assert result["miou"] == pytest.approx(SEG_MIOU)
    assert result["pixel_acc"] == pytest.approx(SEG_PIXEL_ACC)


def test_segmentation_logits_match_predictions() -> None:
    meter = SegmentationMeter(num_classes=3)
    meter.update(_one_hot_logits(SEG_PRED, 3), SEG_TARGET)
    assert meter.compute() == pytest.approx({"miou": SEG_MIOU, "pixel_acc": SEG_PIXEL_ACC})


def test_segmentation_excludes_classes_absent_from_target_and_prediction() -> None:
    # Class 3 occurs nowhere: it is left out of the mean instead of turning it into NaN.
    meter = SegmentationMeter(num_classes=4)
    meter.update(SEG_PRED, SEG_TARGET)
    iou = meter.class_iou()
    assert math.isnan(iou[3].item())
    assert meter.compute()["miou"] == pytest.approx(SEG_MIOU)


def test_segmentation_class_only_in_prediction_counts_with_zero_iou() -> None:
    meter = SegmentationMeter(num_classes=2)
    meter.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 0]]]))
    # IoU_0 = 1 / 2, IoU_1 = 0 / 1 (predicted but never true).
    assert meter.compute() == pytest.approx({"miou": 0.25, "pixel_acc": 0.5})


def test_segmentation_ignore_index_and_out_of_range_targets_are_skipped() -> None:
    meter = SegmentationMeter(num_classes=3, ignore_index=255)
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    meter.update(SEG_PRED, target)
    assert meter.compute() == pytest.approx({"miou": SEG_MIOU, "pixel_acc": SEG_PIXEL_ACC})

    meter = SegmentationMeter(num_classes=3)
    target = torch.tensor([[[0, 0, 1], [1, 2, 7]]])  # 7 is outside [0, 3)
    meter.update(SEG_PRED, target)
    assert meter.count == 5
    assert meter.compute()["miou"] == pytest.approx(SEG_MIOU)


def test_segmentation_accepts_float_targets() -> None:
    meter = SegmentationMeter(num_classes=3)
    meter.update(SEG_PRED, SEG_TARGET.float())
    assert meter.compute()["miou"] == pytest.approx(SEG_MIOU)


def test_segmentation_accumulates_over_the_split_not_per_batch() -> None:
    # Batch A: two pixels of class 0, both right -> mIoU 1.
    # Batch B: two pixels of class 1, one predicted 0 -> IoU = [0/1, 1/2] -> mIoU 1/4.
    # Split: confusion [[2, 0], [1, 1]] -> IoU = [2/3, 1/2] -> mIoU 7/12, not (1 + 1/4) / 2.
    pred_a, target_a = torch.tensor([[[0, 0]]]), torch.tensor([[[0, 0]]])
    pred_b, target_b = torch.tensor([[[0, 1]]]), torch.tensor([[[1, 1]]])
    meter = SegmentationMeter(num_classes=2)
    per_batch = []
    for pred, target in ((pred_a, target_a), (pred_b, target_b)):
        single = SegmentationMeter(num_classes=2)
        single.update(pred, target)
        per_batch.append(single.compute()["miou"])
        meter.update(pred, target)
    assert per_batch == pytest.approx([1.0, 0.25])
    assert meter.compute()["miou"] == pytest.approx(7 / 12)
    assert meter.compute()["miou"] != pytest.approx(sum(per_batch) / 2)
    assert meter.compute()["pixel_acc"] == pytest.approx(3 / 4)

    whole = SegmentationMeter(num_classes=2)
    whole.update(torch.cat([pred_a, pred_b]), torch.cat([target_a, target_b]))
    assert torch.equal(whole.confusion, meter.confusion)


def test_segmentation_several_updates_equal_one_and_match_naive_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, 4, 7, generator=gen)
    target = torch.randint(-1, 5, (6, 4, 7), generator=gen)
    chunked = SegmentationMeter(num_classes=5)
    for i in range(0, 6, 2):
        chunked.update(logits[i : i + 2], target[i : i + 2])
    whole = SegmentationMeter(num_classes=5)
    whole.update(logits, target)
    assert torch.equal(chunked.confusion, whole.confusion)
    assert chunked.compute()["miou"] == pytest.approx(
        _naive_miou(logits.argmax(1), target, num_classes=5)
    )


def test_segmentation_state_merge_and_reset() -> None:
    first, second, whole = (SegmentationMeter(num_classes=3) for _ in range(3))
    first.update(SEG_PRED, SEG_TARGET)
    second.update(SEG_TARGET.clamp(min=0), SEG_TARGET)
    whole.update(torch.cat([SEG_PRED, SEG_TARGET.clamp(min=0)]), torch.cat([SEG_TARGET] * 2))
    first.merge(second.state())
    assert torch.equal(first.confusion, whole.confusion)
    first.reset()
    assert first.count == 0
    with pytest.raises(ValueError, match="no valid pixels"):
        first.compute()


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 4), "does not match"),
        (torch.zeros(1, 4, 2, 3), torch.zeros(1, 2, 3), "channels"),
        (torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), "integer"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(1, 2, 3), r"\[B, K, H, W\]"),
        (torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(2, 3), "target"),
        (torch.full((1, 2, 3), 3), torch.zeros(1, 2, 3), r"\[0, 3\)"),
    ],
)
def test_segmentation_rejects_bad_inputs(
    pred: torch.Tensor, target: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SegmentationMeter(num_classes=3).update(pred, target)


def test_segmentation_empty_meter_and_all_ignored_raise() -> None:
    meter = SegmentationMeter(num_classes=3)
    with pytest.raises(ValueError, match="no valid pixels"):
        meter.compute()
    meter.update(SEG_PRED, torch.full_like(SEG_TARGET, -1))
    with pytest.raises(ValueError, match="no valid pixels"):
        meter.compute()


# --------------------------------------------------------------------------------------------
# DepthMeter
# --------------------------------------------------------------------------------------------

DEPTH_PRED = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])
DEPTH_TARGET = torch.tensor([[[2.0, 0.0, 3.0], [2.0, 4.0, 0.0]]])
# Valid (pred, target): (1,2) (3,3) (4,2) (5,4); |p − t| = 1, 0, 2, 1; /t = 1/2, 0, 1, 1/4.
DEPTH_ABS = (1 + 0 + 2 + 1) / 4
DEPTH_REL = (0.5 + 0 + 1 + 0.25) / 4


def test_depth_hand_computed_skips_invalid_pixels() -> None:
    meter = DepthMeter()
    meter.update(DEPTH_PRED, DEPTH_TARGET)
    assert meter.count == 4
    assert meter.compute() == pytest.approx({"abs_err": DEPTH_ABS, "rel_err": DEPTH_REL})


@pytest.mark.parametrize(("pred_channel", "target_channel"), [(True, True), (True, False)])
def test_depth_accepts_channel_dimension(pred_channel: bool, target_channel: bool) -> None:
    meter = DepthMeter()
    pred = DEPTH_PRED.unsqueeze(1) if pred_channel else DEPTH_PRED
    target = DEPTH_TARGET.unsqueeze(1) if target_channel else DEPTH_TARGET
    meter.update(pred, target)
    assert meter.compute() == pytest.approx({"abs_err": DEPTH_ABS, "rel_err": DEPTH_REL})


def test_depth_custom_invalid_value() -> None:
    meter = DepthMeter(invalid_value=-1.0)
    meter.update(torch.tensor([[[1.0, 9.0]]]), torch.tensor([[[2.0, -1.0]]]))
    assert meter.compute() == pytest.approx({"abs_err": 1.0, "rel_err": 0.5})


def test_depth_accumulates_pixels_not_batch_means() -> None:
    # Batch A: one valid pixel, error 1. Batch B: three valid pixels, error 0.
    # Pixel-accumulated: 1 / 4; MTAN's mean of batch means would give (1 + 0) / 2.
    batches = [
        (torch.tensor([[[3.0, 5.0]]]), torch.tensor([[[2.0, 0.0]]])),
        (torch.tensor([[[1.0, 1.0, 1.0]]]), torch.tensor([[[1.0, 1.0, 1.0]]])),
    ]
    meter = DepthMeter()
    per_batch = []
    for pred, target in batches:
        single = DepthMeter()
        single.update(pred, target)
        per_batch.append(single.compute()["abs_err"])
        meter.update(pred, target)
    result = meter.compute()
    assert result["abs_err"] == pytest.approx(0.25)
    assert result["rel_err"] == pytest.approx(0.5 / 4)
    assert result["abs_err"] != pytest.approx(sum(per_batch) / 2)


def test_depth_several_updates_equal_one_merge_and_reset() -> None:
    gen = torch.Generator().manual_seed(1)
    pred = torch.rand(6, 1, 5, 4, generator=gen) * 10
    target = torch.rand(6, 1, 5, 4, generator=gen) * 10
    target[target < 2] = 0.0
    whole, first, second = DepthMeter(), DepthMeter(), DepthMeter()
    whole.update(pred, target)
    first.update(pred[:2], target[:2])
    first.update(pred[2:4], target[2:4])
    second.update(pred[4:], target[4:])
    first.merge(second.state())
    assert first.count == whole.count == int((target != 0).sum())
    assert first.compute() == pytest.approx(whole.compute())
    valid = target != 0
    err = (pred - target).abs()[valid]
    assert whole.compute() == pytest.approx(
        {"abs_err": err.mean().item(), "rel_err": (err / target[valid]).mean().item()}
    )
    first.reset()
    with pytest.raises(ValueError, match="no valid pixels"):
        first.compute()


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (torch.zeros(1, 2, 3), torch.ones(1, 2, 4), "does not match"),
        (torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 3), r"pred must have shape"),
        (torch.zeros(1, 2, 3), torch.ones(2, 3), r"target must have shape"),
    ],
)
def test_depth_rejects_bad_shapes(pred: torch.Tensor, target: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DepthMeter().update(pred, target)


def test_depth_empty_meter_raises() -> None:
    meter = DepthMeter()
    with pytest.raises(ValueError, match="no valid pixels"):
        meter.compute()
    meter.update(DEPTH_PRED, torch.zeros_like(DEPTH_TARGET))
    with pytest.raises(ValueError, match="no valid pixels"):
        meter.compute()


# --------------------------------------------------------------------------------------------
# NormalMeter
# --------------------------------------------------------------------------------------------


def _at_angle(degrees: float, length: float = 1.0) -> list[float]:
    """A vector at ``degrees`` from +z, in the x-z plane."""
    rad = math.radians(degrees)
    return [length * math.sin(rad), 0.0, length * math.cos(rad)]


def _image(vectors: list[list[float]], height: int, width: int) -> torch.Tensor:
    """``[1, 3, H, W]`` from H·W vectors in row-major order."""
    return torch.tensor(vectors).reshape(height, width, 3).permute(2, 0, 1).unsqueeze(0)


UP = [0.0, 0.0, 1.0]
ZERO = [0.0, 0.0, 0.0]
# One 2×3 image; target +z except the last pixel (all-zero = invalid). Predictions at
# 0°, 20°, 25° (length 3: normalised inside), 90°, 180°, and anything on the invalid pixel.
NORMAL_PRED = _image(
    [_at_angle(0), _at_angle(20), _at_angle(25, 3.0), _at_angle(90), _at_angle(180), UP], 2, 3
)
NORMAL_TARGET = _image([UP, UP, UP, UP, UP, ZERO], 2, 3)
# Angles [0, 20, 25, 90, 180]: mean 63, median 25, under 11.25 / 22.5 / 30: 1, 2, 3 of 5.
NORMAL_EXPECTED = {
    "angle_mean": 63.0,
    "angle_median": 25.0,
    "within_11.25": 0.2,
    "within_22.5": 0.4,
    "within_30": 0.6,
}


def test_normal_hand_computed_odd_count() -> None:
    meter = NormalMeter()
    meter.update(NORMAL_PRED, NORMAL_TARGET)
    assert meter.count == 5
    assert meter.compute() == pytest.approx(NORMAL_EXPECTED, abs=1e-4)


def test_normal_exact_median_of_even_count_is_mean_of_middle_pair() -> None:
    meter = NormalMeter()
    pred = _image([_at_angle(a) for a in (40, 10, 30, 20)], 2, 2)
    meter.update(pred, _image([UP] * 4, 2, 2))
    result = meter.compute()
    assert result["angle_median"] == pytest.approx(25.0, abs=1e-4)
    assert result["angle_mean"] == pytest.approx(25.0, abs=1e-4)
    assert result["within_11.25"] == pytest.approx(0.25)
    assert result["within_22.5"] == pytest.approx(0.5)
    assert result["within_30"] == pytest.approx(0.5)  # 30° is not strictly below 30°


def test_normal_median_is_over_the_split_not_a_mean_of_batch_medians() -> None:
    # Batch 1: angles [0, 20, 25, 90, 180] (median 25). Batch 2: [45, 60] (median 52.5).
    # Split: [0, 20, 25, 45, 60, 90, 180] -> median 45, whereas MTAN reports (25 + 52.5) / 2.
    meter = NormalMeter()
    meter.update(NORMAL_PRED, NORMAL_TARGET)
    meter.update(_image([_at_angle(45), _at_angle(60)], 1, 2), _image([UP, UP], 1, 2))
    result = meter.compute()
    assert result["angle_median"] == pytest.approx(45.0, abs=1e-4)
    assert result["angle_median"] != pytest.approx((25 + 52.5) / 2, abs=1e-2)
    assert result["angle_mean"] == pytest.approx(420 / 7, abs=1e-4)
    assert result["within_30"] == pytest.approx(3 / 7)


def test_normal_sign_conventions() -> None:
    gen = torch.Generator().manual_seed(2)
    target = torch.nn.functional.normalize(torch.randn(2, 3, 4, 5, generator=gen), dim=1)
    same, flipped = NormalMeter(), NormalMeter()
    same.update(target * 2.5, target)
    flipped.update(-target, target)
    assert same.compute()["angle_mean"] == pytest.approx(0.0, abs=1e-4)
    assert same.compute()["angle_median"] == pytest.approx(0.0, abs=1e-4)
    assert same.compute()["within_11.25"] == 1.0
    assert flipped.compute()["angle_mean"] == pytest.approx(180.0, abs=1e-4)
    assert flipped.compute()["within_30"] == 0.0


def test_normal_several_updates_equal_one_merge_and_reset() -> None:
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(4, 3, 3, 5, generator=gen)
    target = torch.nn.functional.normalize(torch.randn(4, 3, 3, 5, generator=gen), dim=1)
    target[:, :, 0, 0] = 0.0  # one invalid pixel per image
    whole, first, second = NormalMeter(), NormalMeter(), NormalMeter()
    whole.update(pred, target)
    first.update(pred[:1], target[:1])
    first.update(pred[1:2], target[1:2])
    second.update(pred[2:], target[2:])
    first.merge(second.state())
    assert first.count == whole.count == 4 * 15 - 4
    assert first.compute() == pytest.approx(whole.compute())
    # Naive reference for the angles themselves.
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=1)
    angles = torch.rad2deg(torch.acos(cos.clamp(-1, 1)))[target.abs().sum(1) > 0]
    assert torch.allclose(whole.state(), angles, atol=1e-3)
    # 56 angles: the median is the mean of the 28th and 29th (torch.median returns the 28th).
    ordered = angles.sort().values
    naive_median = float(ordered[27] + ordered[28]) / 2
    assert whole.compute()["angle_median"] == pytest.approx(naive_median, abs=1e-3)
    first.reset()
    assert first.count == 0
    with pytest.raises(ValueError, match="no valid pixels"):
        first.compute()


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (torch.zeros(1, 3, 2, 3), torch.ones(1, 3, 2, 4), "does not match"),
        (torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2, 3), r"\[B, 3, H, W\]"),
        (torch.zeros(3, 2, 3), torch.ones(3, 2, 3), r"\[B, 3, H, W\]"),
    ],
)
def test_normal_rejects_bad_shapes(pred: torch.Tensor, target: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NormalMeter().update(pred, target)


def test_normal_empty_meter_raises() -> None:
    meter = NormalMeter()
    with pytest.raises(ValueError, match="no valid pixels"):
        meter.compute()
    meter.update(NORMAL_PRED, torch.zeros_like(NORMAL_TARGET))
    with pytest.raises(ValueError, match="no valid pixels"):
        meter.compute()


# --------------------------------------------------------------------------------------------
# metric_names
# --------------------------------------------------------------------------------------------


def test_metric_names_match_meter_outputs_and_have_directions() -> None:
    seg = SegmentationMeter(num_classes=3)
    seg.update(SEG_PRED, SEG_TARGET)
    depth = DepthMeter()
    depth.update(DEPTH_PRED, DEPTH_TARGET)
    normal = NormalMeter()
    normal.update(NORMAL_PRED, NORMAL_TARGET)
    for meter in (seg, depth, normal):
        names = list(meter.metric_names)
        assert list(meter.compute()) == names
        assert all(name in METRIC_HIGHER_IS_BETTER for name in names)
