"""Dense objectives (task sum, URL's dense distillation), Δm selection, evaluator, figure."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from unirep.config import DenseTaskConfig, DistillConfig, Spec
from unirep.dense_eval import DenseEvaluator, selection_delta_m, task_score
from unirep.dense_metrics import DepthMeter, NormalMeter, SegmentationMeter
from unirep.models.dense import build_dense_network
from unirep.objective import DenseDistillationObjective, DenseTaskObjective
from unirep.report import dense_grid_figure

TASKS = {
    "semantic": DenseTaskConfig(Spec("cross_entropy")),
    "depth": DenseTaskConfig(Spec("depth_l1"), weight=0.5),
    "normal": DenseTaskConfig(Spec("normal_cosine")),
}


def _batch(b: int = 2, h: int = 32, w: int = 32, k: int = 5) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, h, w, generator=g)
    normal = F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
    targets = {
        "semantic": torch.randint(-1, k, (b, h, w), generator=g),
        "depth": torch.rand(b, 1, h, w, generator=g) * 5,
        "normal": normal,
    }
    return images, targets


def _net(align: dict[str, int] | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return build_dense_network(
        "segnet",
        {"width_mult": 0.125},
        {"semantic": 5, "depth": 1, "normal": 3},
        decoder_channels=8,
        align_dims=align,
    )


def _teacher(task: str, seed: int):
    torch.manual_seed(seed)
    channels = {"semantic": 5, "depth": 1, "normal": 3}[task]
    net = build_dense_network("segnet", {"width_mult": 0.125}, {task: channels}, decoder_channels=6)
    return net.eval()


def test_task_objective_is_the_weighted_sum_of_task_losses() -> None:
    images, targets = _batch()
    out = _net()(images)
    terms = DenseTaskObjective(TASKS)(out, targets)
    valid = targets["semantic"] != -1
    ce = F.cross_entropy(out["semantic"]["pred"], targets["semantic"], ignore_index=-1)
    d_valid = targets["depth"] != 0
    l1 = (out["depth"]["pred"] - targets["depth"]).abs()[d_valid].mean()
    cos = 1 - (out["normal"]["pred"] * targets["normal"]).sum(1).mean()
    assert valid.any()
    torch.testing.assert_close(terms["task/semantic"], ce.detach())
    torch.testing.assert_close(terms["task/depth"], l1.detach())
    torch.testing.assert_close(terms["task/normal"], cos.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["loss"], ce + 0.5 * l1 + cos, rtol=1e-4, atol=1e-5)


def _normalized_l2(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
    return (F.normalize(s, dim=1) - F.normalize(t, dim=1)).pow(2).sum(1).mean()


def test_distillation_objective_matches_url_by_hand() -> None:
    images, targets = _batch()
    teachers = {t: _teacher(t, i + 10) for i, t in enumerate(TASKS)}
    net = _net({t: 6 for t in TASKS})
    out = net(images)
    with torch.no_grad():
        teacher_out = {t: m(images)[t] for t, m in teachers.items()}
    tasks = dict(TASKS)
    tasks["semantic"] = DenseTaskConfig(
        Spec("cross_entropy"), prediction_loss=Spec("kl", {"temperature": 2.0})
    )
    cfg = DistillConfig(
        feature_loss=Spec("l2"),
        lambda_feature={"semantic": 1.0, "depth": 1.0, "normal": 2.0},
        lambda_prediction={"semantic": 0.5},
        feature_scale=1.5,
        prediction_scale=1.0,
        annealing="linear",
    )
    objective = DenseDistillationObjective(tasks, cfg)
    terms = objective(out, targets, teacher_out, step=1, total_steps=4)  # annealing 0.75
    expected = DenseTaskObjective(tasks)(out, targets)["loss"]
    for task, lam in cfg.lambda_feature.items():
        t_feat = teacher_out[task]["features"]
        feat = _normalized_l2(out[task]["aligned_bottleneck"], t_feat) + _normalized_l2(
            out[task]["aligned_features"], t_feat
        )
        torch.testing.assert_close(terms[f"feature/{task}"], feat.detach(), rtol=1e-4, atol=1e-6)
        expected = expected + 0.75 * 1.5 * lam * feat
    s, t = out["semantic"]["pred"] / 2, teacher_out["semantic"]["pred"] / 2
    kl = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean() * 4
    torch.testing.assert_close(terms["prediction/semantic"], kl.detach(), rtol=1e-4, atol=1e-6)
    expected = expected + 0.75 * 0.5 * kl
    assert "prediction/depth" not in terms
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-4, atol=1e-5)
    # gradients reach the adapters, never the teachers
    terms["loss"].backward()
    assert net.align_bottleneck["normal"].weight.grad.abs().sum() > 0
    assert net.align_features["depth"].weight.grad.abs().sum() > 0
    assert all(p.grad is None for m in teachers.values() for p in m.parameters())


def test_distillation_needs_teacher_outputs() -> None:
    images, targets = _batch()
    net = _net({t: 6 for t in TASKS})
    objective = DenseDistillationObjective(TASKS, DistillConfig(feature_loss=Spec("l2")))
    with pytest.raises(ValueError, match="teachers"):
        objective(net(images), targets)


def test_selection_scores() -> None:
    teacher = {"semantic": {"miou": 0.5, "pixel_acc": 0.8}, "depth": {"abs_err": 1.0}}
    better = {"semantic": {"miou": 0.55, "pixel_acc": 0.1}, "depth": {"abs_err": 0.9}}
    # main metrics only: (+10% + 10%) / 2; pixel accuracy does not count
    assert selection_delta_m(teacher)(better) == pytest.approx(10.0)
    # a teacher at 0 leaves its task out instead of failing
    zero = {"semantic": {"miou": 0.0}, "depth": {"abs_err": 1.0}}
    assert selection_delta_m(zero)(better) == pytest.approx(10.0)
    assert task_score("semantic", better) == 0.55 and task_score("depth", better) == -0.9


def test_evaluator_equals_meters_over_the_whole_split() -> None:
    images, targets = _batch(b=5, k=5)
    samples = [
        {"image": images[i], **{t: v[i] for t, v in targets.items()}, "index": i} for i in range(5)
    ]
    net = _net().eval()
    evaluator = DenseEvaluator(Accelerator(cpu=True), batch_size=2, num_classes=5)
    results = evaluator.evaluate(net, "test", {"dense": samples})
    with torch.no_grad():
        out = net(images)
    seg, depth, normal = SegmentationMeter(5), DepthMeter(), NormalMeter()
    seg.update(out["semantic"]["pred"], targets["semantic"])
    depth.update(out["depth"]["pred"], targets["depth"])
    normal.update(out["normal"]["pred"], targets["normal"])
    assert results["semantic"] == pytest.approx(seg.compute())
    assert results["depth"] == pytest.approx(depth.compute(), rel=1e-5)
    assert results["normal"] == pytest.approx(normal.compute(), rel=1e-4)


def test_qualitative_grid_is_a_png_with_a_row_per_image_and_task() -> None:
    from PIL import Image

    images, targets = _batch(b=2, k=5)
    columns = {"ground truth": targets, "student": {**targets, "depth": targets["depth"] * 2}}
    png = dense_grid_figure(images, columns, ["semantic", "depth", "normal"], num_classes=5)
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.height > picture.width  # 6 rows, 3 columns
