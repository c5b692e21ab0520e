"""Dense objectives (task sum, URL's dense distillation), Δm selection, evaluator, figure."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from unirep.batch import Batch
from unirep.config.schema import DistillConfig, Spec
from unirep.metrics.dense import DepthMeter, NormalMeter, SegmentationMeter
from unirep.models.dense import build_dense_network
from unirep.objective import Objective
from unirep.pipeline.report import prediction_grid_figure
from unirep.tasks import TASK_KINDS, Task, task_score
from unirep.training.evaluator import Evaluator, delta_m_score

STREAM = "images"
CHANNELS = {"semantic": 5, "depth": 1, "normal": 3}


def _tasks(**prediction_losses: tuple[str, dict]) -> dict[str, Task]:
    """semantic (cross-entropy), depth (L1, weight 0.5), normal (cosine) on one image stream."""
    losses = {"semantic": "cross_entropy", "depth": "depth_l1", "normal": "normal_cosine"}
    weights = {"depth": 0.5}
    return {
        name: Task(
            name=name,
            kind=TASK_KINDS.build(name),
            stream=STREAM,
            num_classes=CHANNELS["semantic"] if name == "semantic" else None,
            loss=(loss, {}),
            prediction_loss=prediction_losses.get(name),
            weight=weights.get(name, 1.0),
        )
        for name, loss in losses.items()
    }


TASKS = _tasks()


def _batch(b: int = 2, h: int = 32, w: int = 32, k: int = 5) -> Batch:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, h, w, generator=g)
    normal = F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
    targets = {
        "semantic": torch.randint(-1, k, (b, h, w), generator=g),
        "depth": torch.rand(b, 1, h, w, generator=g) * 5,
        "normal": normal,
    }
    mask = {t: torch.ones(b, dtype=torch.bool) for t in targets}
    return Batch(inputs={STREAM: images}, targets=targets, label_mask=mask)


def _net(seed: int = 0):
    torch.manual_seed(seed)
    return build_dense_network(
        "segnet", {"width_mult": 0.125}, CHANNELS, decoder_channels=8, unit_vector=["normal"]
    )


def _teacher(task: str, seed: int):
    torch.manual_seed(seed)
    net = build_dense_network(
        "segnet",
        {"width_mult": 0.125},
        {task: CHANNELS[task]},
        decoder_channels=6,
        unit_vector=["normal"] if task == "normal" else [],
    )
    return net.eval()


def test_task_objective_is_the_weighted_sum_of_task_losses() -> None:
    batch = _batch()
    out = _net()(batch.inputs)
    bundle = Objective(TASKS)(out, {}, batch)
    targets = batch.targets
    valid = targets["semantic"] != -1
    ce = F.cross_entropy(out["semantic"]["pred"], targets["semantic"], ignore_index=-1)
    d_valid = targets["depth"] != 0
    l1 = (out["depth"]["pred"] - targets["depth"]).abs()[d_valid].mean()
    cos = 1 - (out["normal"]["pred"] * targets["normal"]).sum(1).mean()
    assert valid.any()
    torch.testing.assert_close(bundle.logs["task/semantic"], ce.detach())
    torch.testing.assert_close(bundle.logs["task/depth"], l1.detach())
    torch.testing.assert_close(bundle.logs["task/normal"], cos.detach(), rtol=1e-4, atol=1e-5)
    # the per-task losses carry the configured weight; no distillation without a config
    torch.testing.assert_close(bundle.supervised["depth"], 0.5 * l1)
    assert bundle.distill == {} and bundle.joint == {}
    torch.testing.assert_close(bundle.total(), ce + 0.5 * l1 + cos, rtol=1e-4, atol=1e-5)


def _normalized_l2(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
    return (F.normalize(s, dim=1) - F.normalize(t, dim=1)).pow(2).sum(1).mean()


def test_distillation_objective_matches_url_by_hand() -> None:
    batch = _batch()
    teachers = {t: _teacher(t, i + 10) for i, t in enumerate(TASKS)}
    net = _net()
    aligners = net.build_aligners({t: 6 for t in TASKS})
    out = net(batch.inputs)
    aligned = {t: aligners[t](out[t]) for t in aligners}
    with torch.no_grad():
        teacher_out = {t: m(batch.inputs)[t] for t, m in teachers.items()}
    tasks = _tasks(semantic=("kl", {"temperature": 2.0}))
    cfg = DistillConfig(
        feature_loss=Spec("l2"),
        lambda_feature={"semantic": 1.0, "depth": 1.0, "normal": 2.0},
        lambda_prediction={"semantic": 0.5},
        feature_scale=1.5,
        prediction_scale=1.0,
        annealing="linear",
    )
    objective = Objective(tasks, cfg)
    bundle = objective(out, aligned, batch, teacher_out, step=1, total_steps=4)  # anneal 0.75
    expected = Objective(tasks)(out, {}, batch).total()
    for task, lam in cfg.lambda_feature.items():
        t_feat = teacher_out[task]["features"]
        bottleneck, features = aligned[task]
        assert bottleneck.shape[-2:] == out[task]["bottleneck"].shape[-2:]
        feat = _normalized_l2(bottleneck, t_feat) + _normalized_l2(features, t_feat)
        torch.testing.assert_close(
            bundle.logs[f"feature/{task}"], feat.detach(), rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(
            bundle.distill[task]["feature"], 0.75 * 1.5 * lam * feat, rtol=1e-4, atol=1e-6
        )
        expected = expected + 0.75 * 1.5 * lam * feat
    s, t = out["semantic"]["pred"] / 2, teacher_out["semantic"]["pred"] / 2
    kl = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean() * 4
    torch.testing.assert_close(
        bundle.logs["prediction/semantic"], kl.detach(), rtol=1e-4, atol=1e-6
    )
    expected = expected + 0.75 * 0.5 * kl
    assert "prediction/depth" not in bundle.logs
    assert set(bundle.distill["depth"]) == {"feature"}
    assert float(bundle.logs["anneal"]) == pytest.approx(0.75)
    torch.testing.assert_close(bundle.total(), expected, rtol=1e-4, atol=1e-5)
    # gradients reach the adapters, never the teachers
    bundle.total().backward()
    assert aligners["normal"].bottleneck.weight.grad.abs().sum() > 0
    assert aligners["depth"].features.weight.grad.abs().sum() > 0
    assert all(p.grad is None for m in teachers.values() for p in m.parameters())


def test_distillation_needs_teacher_outputs() -> None:
    batch = _batch()
    net = _net()
    aligners = net.build_aligners({t: 6 for t in TASKS})
    out = net(batch.inputs)
    aligned = {t: aligners[t](out[t]) for t in aligners}
    objective = Objective(TASKS, DistillConfig(feature_loss=Spec("l2")))
    with pytest.raises(ValueError, match="teachers"):
        objective(out, aligned, batch)


def test_selection_scores() -> None:
    tasks = {t: TASKS[t] for t in ("semantic", "depth")}
    teacher = {"semantic": {"miou": 0.5, "pixel_acc": 0.8}, "depth": {"abs_err": 1.0}}
    better = {"semantic": {"miou": 0.55, "pixel_acc": 0.1}, "depth": {"abs_err": 0.9}}
    # main metrics only: (+10% + 10%) / 2; pixel accuracy does not count
    assert delta_m_score(tasks, teacher)(better) == pytest.approx(10.0)
    # a teacher at 0 leaves its task out instead of failing
    zero = {"semantic": {"miou": 0.0}, "depth": {"abs_err": 1.0}}
    assert delta_m_score(tasks, zero)(better) == pytest.approx(10.0)
    assert task_score(TASKS["semantic"], better) == 0.55
    assert task_score(TASKS["depth"], better) == -0.9


def test_evaluator_equals_meters_over_the_whole_split() -> None:
    batch = _batch(b=5, k=5)
    images, targets = batch.inputs[STREAM], batch.targets
    samples = [
        {"image": images[i], **{t: v[i] for t, v in targets.items()}, "index": i} for i in range(5)
    ]
    net = _net().eval()
    evaluator = Evaluator(Accelerator(cpu=True), batch_size=2)
    keep: dict = {}
    results = evaluator.evaluate(net, "test", {STREAM: samples}, TASKS, keep=keep)
    with torch.no_grad():
        out = net(images)
    seg, depth, normal = SegmentationMeter(5), DepthMeter(), NormalMeter()
    seg.update(out["semantic"]["pred"], targets["semantic"])
    depth.update(out["depth"]["pred"], targets["depth"])
    normal.update(out["normal"]["pred"], targets["normal"])
    assert results["semantic"] == pytest.approx(seg.compute())
    assert results["depth"] == pytest.approx(depth.compute(), rel=1e-5)
    assert results["normal"] == pytest.approx(normal.compute(), rel=1e-4)
    # kept over the whole split: predictions, targets and the samples' ids, in order
    preds, kept_targets, ids = keep["semantic"]
    assert ids.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(preds, out["semantic"]["pred"].argmax(1))
    assert torch.equal(kept_targets, targets["semantic"])


def test_qualitative_grid_is_a_png_with_a_row_per_image_and_task() -> None:
    from PIL import Image

    batch = _batch(b=2, k=5)
    images, targets = batch.inputs[STREAM], batch.targets
    columns = {"ground truth": targets, "student": {**targets, "depth": targets["depth"] * 2}}
    render = {t: task.render for t, task in TASKS.items()}
    png = prediction_grid_figure(images, columns, ["semantic", "depth", "normal"], render)
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.height > picture.width  # 6 rows, 3 columns
