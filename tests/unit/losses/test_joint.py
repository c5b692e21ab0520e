"""Partial-label joint-task losses: MTPSL against a per-image, per-pair loop; JTR by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tests.conftest import random_dense_batch
from unirep.losses.joint import (
    JTRLoss,
    MTPSLLoss,
    PairFiLMEncoder,
    encode_for_mapping,
    straight_through_one_hot,
)

KINDS = {"seg": "semantic", "depth": "depth", "normal": "normal"}
CHANNELS = {"seg": 4, "depth": 1, "normal": 3}
B, H, W, FEAT_C = 4, 16, 16, 8
WIDTHS = (4, 8)


def _batch(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[dict, dict, Tensor]:
    """Predictions, targets with about a fifth of the pixels invalid, and a student feature."""
    preds, targets, g = random_dense_batch(B, H, W, seed, dtype)
    feature = torch.randn(B, FEAT_C, 2, 2, generator=g, dtype=dtype)
    return preds, targets, feature


def _masks(rows: list[set[str]]) -> dict[str, Tensor]:
    return {t: torch.tensor([t in row for row in rows]) for t in KINDS}


def _random_masks(seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t: torch.rand(B, generator=g) > 0.5 for t in KINDS}


def _perturb_film(encoder: PairFiLMEncoder, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.film_parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _mtpsl(mode: str = "partial") -> MTPSLLoss:
    torch.manual_seed(0)
    loss = MTPSLLoss(KINDS, CHANNELS, FEAT_C, mode=mode, widths=WIDTHS).double()
    _perturb_film(loss.mapping)
    return loss


# ---------------------------------------------------------------------------------------------
# MTPSL
# ---------------------------------------------------------------------------------------------


def _naive_mtpsl(
    loss: MTPSLLoss, preds: dict, targets: dict, masks: dict, feature: Tensor
) -> Tensor:
    """MTPSL's loop: every image, every ordered pair, one mapping call per side."""
    size = (feature.shape[-2], feature.shape[-1])

    def cos_dist(a: Tensor, b: Tensor) -> Tensor:
        return 1 - F.cosine_similarity(a, b, dim=1).mean()

    total = feature.new_zeros(())
    for i in range(B):
        for s in KINDS:
            for t in KINDS:
                if s == t or not masks[t][i] or (loss.mode == "partial" and masks[s][i]):
                    continue
                pair = torch.tensor([loss.mapping.pair_index(s, t)])
                src_in = encode_for_mapping(KINDS[s], preds[s][i : i + 1], False, CHANNELS[s])
                tgt_in = encode_for_mapping(KINDS[t], targets[t][i : i + 1], True, CHANNELS[t])
                tgt_in = tgt_in.to(feature.dtype)  # one-hot labels come as float32
                src = loss.mapping(src_in, s, pair, size)
                tgt = loss.mapping(tgt_in, t, pair, size)
                f = feature[i : i + 1].detach()
                reg = cos_dist(src, f) + cos_dist(tgt, f)
                total = total + cos_dist(src, tgt) + loss.lambda_reg * reg
    return total / B


@pytest.mark.parametrize("mode", ["partial", "full"])
@pytest.mark.parametrize("seed", [0, 1])
def test_mtpsl_batched_equals_naive_loop(mode: str, seed: int) -> None:
    loss = _mtpsl(mode)
    preds, targets, feature = _batch(seed)
    masks = _random_masks(seed)
    for p in preds.values():
        p.requires_grad_(True)
    batched = loss(preds, targets, masks, feature)
    naive = _naive_mtpsl(loss, preds, targets, masks, feature)
    assert naive.item() > 0
    assert batched.item() == pytest.approx(naive.item(), abs=1e-5)
    inputs = list(preds.values())
    grads = torch.autograd.grad(batched, inputs, allow_unused=True, materialize_grads=True)
    naive_grads = torch.autograd.grad(naive, inputs, allow_unused=True, materialize_grads=True)
    for g, ng in zip(grads, naive_grads, strict=True):
        torch.testing.assert_close(g, ng, atol=1e-5, rtol=0)


def test_mtpsl_pair_conditions_the_mapping() -> None:
    torch.manual_seed(0)
    encoder = PairFiLMEncoder(CHANNELS, FEAT_C, WIDTHS).double()
    x = torch.rand(2, 4, H, W, dtype=torch.float64)
    first, second = torch.tensor([0, 0]), torch.tensor([0, 1])
    out = encoder(x, "seg", first, (2, 2))
    assert torch.equal(out, encoder(x, "seg", second, (2, 2)))  # γ = 1, β = 0: pairs agree
    _perturb_film(encoder)
    out, other = encoder(x, "seg", first, (2, 2)), encoder(x, "seg", second, (2, 2))
    assert out.shape == (2, FEAT_C, 2, 2)
    torch.testing.assert_close(out[0], other[0])
    assert not torch.allclose(out[1], other[1])
    assert encoder.pair_index("seg", "depth") == 0 and encoder.pair_index("normal", "depth") == 5
    film = encoder.film_parameters()
    assert len(film) == 2 * len(WIDTHS)
    assert all(p.shape == (6, w) for p, w in zip(film, [4, 4, 8, 8], strict=True))


@pytest.mark.parametrize(
    ("mode", "rows"),
    [
        ("partial", [set(KINDS)] * B),
        ("partial", [set()] * B),
        ("full", [set()] * B),
    ],
)
def test_mtpsl_exact_zero_without_pairs(mode: str, rows: list[set[str]]) -> None:
    loss = _mtpsl(mode)
    preds, targets, feature = _batch()
    preds = {t: p.requires_grad_(True) for t, p in preds.items()}
    value = loss(preds, targets, _masks(rows), feature)
    assert value.item() == 0.0
    value.backward()
    for p in preds.values():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    assert all(p.grad is None for p in loss.parameters())


def test_mtpsl_gradient_reaches_unlabelled_predictions_only() -> None:
    loss = _mtpsl("partial")
    preds, targets, feature = _batch()
    preds = {t: p.requires_grad_(True) for t, p in preds.items()}
    targets["depth"].requires_grad_(True)
    feature.requires_grad_(True)
    masks = _masks([{"depth"}, set(KINDS), {"depth"}, {"depth"}])
    loss(preds, targets, masks, feature).backward()
    seg_grad = preds["seg"].grad
    assert seg_grad is not None and torch.count_nonzero(seg_grad[0]) > 0
    assert torch.count_nonzero(seg_grad[1]) == 0  # image 1 is fully labelled: no pair
    assert torch.count_nonzero(preds["normal"].grad[0]) > 0
    assert preds["depth"].grad is None  # depth is labelled wherever it appears: only a target
    assert targets["depth"].grad is None and feature.grad is None
    assert all(p.grad is not None for p in loss.mapping.film_parameters())


def test_mtpsl_partial_and_full_pair_counts() -> None:
    rows = [{"seg"}, {"seg", "depth"}, set(KINDS), set()]
    masks = _masks(rows)
    for mode, expected in (("partial", [2, 2, 0, 0]), ("full", [2, 4, 6, 0])):
        image, pair = _mtpsl(mode).instances(masks)
        assert torch.bincount(image, minlength=B).tolist() == expected
        assert pair.max() < 6
    image, pair = _mtpsl("partial").instances(masks)
    enc = _mtpsl().mapping
    expected_pairs = [
        enc.pair_index(s, t)
        for s, t in [("depth", "seg"), ("normal", "seg"), ("normal", "seg"), ("normal", "depth")]
    ]
    assert sorted(pair.tolist()) == sorted(expected_pairs)


def test_mtpsl_feature_shape_checked() -> None:
    preds, targets, feature = _batch()
    with pytest.raises(ValueError, match="feature"):
        _mtpsl()(preds, targets, _random_masks(0), feature[:, :3])


def test_straight_through_one_hot_is_one_hot_with_softmax_gradient() -> None:
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    hard = straight_through_one_hot(logits)
    expected = F.one_hot(logits.argmax(1), 5).permute(0, 3, 1, 2).to(hard.dtype)
    assert torch.equal(hard, expected)
    (grad,) = torch.autograd.grad((hard * weights).sum(), logits)
    (soft_grad,) = torch.autograd.grad((logits.softmax(1) * weights).sum(), logits)
    assert torch.count_nonzero(grad) > 0
    torch.testing.assert_close(grad, soft_grad)
    assert torch.equal(encode_for_mapping("semantic", logits, False), hard)


def test_encode_for_mapping_targets() -> None:
    labels = torch.tensor([[[0, -1], [2, 1]]])
    hot = encode_for_mapping("semantic", labels, True, num_classes=3)
    assert hot.shape == (1, 3, 2, 2)
    assert hot[0, :, 0, 1].tolist() == [0, 0, 0]
    assert hot[0, :, 1, 0].tolist() == [0, 0, 1]
    normal = torch.zeros(1, 3, 2, 2)
    normal[0, 2, 0, 0] = 1.0
    encoded = encode_for_mapping("normal", normal, True)
    assert encoded[0, :, 0, 0].tolist() == [0.5, 0.5, 1.0]
    assert torch.count_nonzero(encoded[0, :, 1]) == 0  # invalid pixels stay 0
    with pytest.raises(ValueError, match="num_classes"):
        encode_for_mapping("semantic", labels, True)


@pytest.mark.parametrize("is_target", [True, False])
def test_depth_divided_by_its_own_image_maximum(is_target: bool) -> None:
    depth = torch.tensor([[[[0.0, 1.0], [2.0, 0.5]]], [[[10.0, 0.0], [5.0, 2.5]]]])
    encoded = encode_for_mapping("depth", depth, is_target)
    expected = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]], [[[1.0, 0.0], [0.5, 0.25]]]])
    torch.testing.assert_close(encoded, expected)
    empty = encode_for_mapping("depth", torch.zeros(1, 1, 2, 2), is_target)
    assert torch.equal(empty, torch.zeros(1, 1, 2, 2))  # all invalid: 0, not NaN


def test_mtpsl_rejects_bad_configuration() -> None:
    with pytest.raises(KeyError, match="unknown task kind 'edges'"):
        MTPSLLoss({"a": "edges", "b": "depth"}, {"a": 1, "b": 1}, FEAT_C)
    with pytest.raises(ValueError, match="mode"):
        MTPSLLoss(KINDS, CHANNELS, FEAT_C, mode="half")
    with pytest.raises(ValueError, match="channels"):
        MTPSLLoss(KINDS, {**CHANNELS, "normal": 2}, FEAT_C)


# ---------------------------------------------------------------------------------------------
# JTR
# ---------------------------------------------------------------------------------------------


def _jtr(**kw: float) -> JTRLoss:
    torch.manual_seed(0)
    return JTRLoss(KINDS, CHANNELS, widths=WIDTHS, **kw).double()


def _phi(x: Tensor) -> Tensor:
    return torch.special.ndtr((x - 2.3618) / 1.5876)


def test_jtr_substitutes_labels_where_labelled_and_valid() -> None:
    loss = _jtr()
    preds, targets, _ = _batch()
    preds = {t: p.requires_grad_(True) for t, p in preds.items()}
    masks = _masks([{"seg", "normal"}, {"depth"}, set(), set(KINDS)])
    pred_stack, target_stack = loss.stacks(preds, targets, masks)
    assert pred_stack.shape == target_stack.shape == (B, 8, H, W)
    assert not target_stack.requires_grad

    own_seg = F.one_hot(preds["seg"].argmax(1), 4).permute(0, 3, 1, 2).double()
    label_seg = F.one_hot(targets["seg"].clamp_min(0), 4).permute(0, 3, 1, 2).double()
    seg_valid = (targets["seg"] != -1).unsqueeze(1)
    depth_valid = targets["depth"] != 0
    normal_valid = (targets["normal"] != 0).any(1, keepdim=True)
    seg_labelled = masks["seg"].view(-1, 1, 1, 1)
    depth_labelled = masks["depth"].view(-1, 1, 1, 1)
    normal_labelled = masks["normal"].view(-1, 1, 1, 1)
    expected_seg = torch.where(seg_labelled & seg_valid, label_seg, own_seg)
    expected_depth = torch.where(
        depth_labelled & depth_valid, _phi(targets["depth"]), _phi(preds["depth"])
    )
    expected_normal = torch.where(
        normal_labelled & normal_valid, targets["normal"], preds["normal"]
    )
    torch.testing.assert_close(target_stack[:, :4], expected_seg)
    torch.testing.assert_close(target_stack[:, 4:5], expected_depth)
    torch.testing.assert_close(target_stack[:, 5:], (expected_normal + 1) / 2)
    assert seg_valid[0].logical_not().any() and depth_valid[1].logical_not().any()

    torch.testing.assert_close(pred_stack[:, :4], preds["seg"].softmax(1))
    torch.testing.assert_close(pred_stack[:, 4:5], _phi(preds["depth"]))
    torch.testing.assert_close(pred_stack[:, 5:], (preds["normal"] + 1) / 2)
    # Predictions of labelled tasks enter detached (JTR).
    pred_stack.sum().backward()
    assert torch.count_nonzero(preds["seg"].grad[0]) == 0
    assert torch.count_nonzero(preds["seg"].grad[1]) > 0
    assert torch.count_nonzero(preds["depth"].grad[1]) == 0
    assert torch.count_nonzero(preds["depth"].grad[0]) > 0


def test_jtr_distance_zero_when_predictions_match_the_labels() -> None:
    loss = _jtr()
    preds, targets, _ = _batch()
    labels = targets["seg"].clamp_min(0)
    valid = torch.ones(B, 1, H, W, dtype=torch.bool)
    targets = {
        "seg": labels,
        "depth": targets["depth"] + (targets["depth"] == 0),
        "normal": torch.where(valid, preds["normal"], 0),
    }
    preds = {
        "seg": 40.0 * F.one_hot(labels, 4).permute(0, 3, 1, 2).double(),
        "depth": targets["depth"].clone(),
        "normal": targets["normal"].clone(),
    }
    pred_stack, target_stack = loss.stacks(preds, targets, _masks([set(KINDS)] * B))
    torch.testing.assert_close(pred_stack, target_stack)
    _, parts = loss(preds, targets, _masks([set(KINDS)] * B))
    assert parts["distance"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["reconstruction"].item() > 0


def test_jtr_gradient_routing() -> None:
    preds, targets, _ = _batch()
    preds = {t: p.requires_grad_(True) for t, p in preds.items()}
    masks = _masks([{"depth"}, {"seg"}, {"seg", "normal"}, set()])
    loss = _jtr()
    total, parts = loss(preds, targets, masks)
    expected = 4.0 * parts["distance"] + 2.0 * parts["reconstruction"]
    assert total.item() == pytest.approx(expected.item())
    assert not parts["distance"].requires_grad and not parts["reconstruction"].requires_grad
    total.backward()
    for name, p in loss.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    assert torch.count_nonzero(preds["seg"].grad[0]) > 0

    # The reconstruction alone trains the network and never reaches the predictions.
    preds = {t: p.detach().requires_grad_(True) for t, p in preds.items()}
    loss = _jtr(distance_weight=0.0)
    total, _ = loss(preds, targets, masks)
    total.backward()
    assert all(torch.count_nonzero(p.grad) > 0 for p in loss.space.parameters())
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in preds.values())


def test_jtr_all_unlabelled_batch_is_finite() -> None:
    preds, targets, _ = _batch()
    preds = {t: p.requires_grad_(True) for t, p in preds.items()}
    loss = _jtr()
    total, parts = loss(preds, targets, _masks([set()] * B))
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
    assert all(torch.isfinite(p.grad).all() for p in preds.values())
    assert all(torch.isfinite(p.grad).all() for p in loss.parameters())


def test_jtr_float32_and_checks() -> None:
    preds, targets, _ = _batch(dtype=torch.float32)
    torch.manual_seed(0)
    loss = JTRLoss(KINDS, CHANNELS, widths=WIDTHS)
    total, _ = loss(preds, targets, _random_masks(0))
    assert total.dtype == torch.float32 and torch.isfinite(total)
    with pytest.raises(ValueError, match="lack the tasks"):
        loss({"seg": preds["seg"]}, targets, _random_masks(0))
    with pytest.raises(ValueError, match="masks"):
        loss(preds, targets, {t: torch.ones(B + 1, dtype=torch.bool) for t in KINDS})
