"""The objective (:mod:`unirep.objective`) for both kinds of run: per-task bundle entries,
per-task λ, annealing and gradients to the aligners (classification), then the dense objectives
(task sum, URL's dense distillation by hand), Δm selection, the evaluator and the report figure."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from unirep.batch import Batch
from unirep.config.schema import DistillConfig, Spec
from unirep.metrics.dense import DepthMeter, NormalMeter, SegmentationMeter
from unirep.models.build import build_network
from unirep.models.dense import build_dense_network
from unirep.objective import Objective, annealing_factor, distillation_weights
from unirep.pipeline.report import prediction_grid_figure
from unirep.tasks import TASK_KINDS, Task, task_score
from unirep.training.evaluator import Evaluator, delta_m_score

ARCH = {"backbone": "resnet_decathlon_tiny", "backbone_kwargs": {}}
TEMPERATURE = 2.0


def test_annealing() -> None:
    assert annealing_factor("linear", 0, 100) == 1.0
    assert annealing_factor("linear", 50, 100) == 0.5
    assert annealing_factor("linear", 100, 100) == 0.0
    assert annealing_factor("none", 70, 100) == 1.0
    with pytest.raises(ValueError, match="cosine"):
        annealing_factor("cosine", 1, 2)


def _tasks() -> dict[str, Task]:
    kind = TASK_KINDS.build("classification")
    return {
        d: Task(d, kind, d, k, prediction_loss=("kl", {"temperature": TEMPERATURE}))
        for d, k in (("a", 3), ("b", 4))
    }


def _setup():
    torch.manual_seed(0)
    tasks = _tasks()
    student = build_network(ARCH, tasks)
    teachers = {d: build_network(ARCH, {d: task}).eval() for d, task in tasks.items()}
    aligners = student.build_aligners({d: t.feature_dim for d, t in teachers.items()}, "linear")
    images = {"a": torch.randn(4, 3, 28, 28), "b": torch.randn(4, 3, 28, 28)}
    labels = {"a": torch.tensor([0, 1, 2, 0]), "b": torch.tensor([3, 1, 2, 0])}
    batch = Batch(
        inputs=images,
        targets=labels,
        label_mask={d: torch.ones(4, dtype=torch.bool) for d in tasks},
    )
    with torch.no_grad():
        t_out = {d: teachers[d]({d: x})[d] for d, x in images.items()}
    return tasks, student, aligners, batch, t_out


def _forward(student, aligners, batch):
    outputs = student(batch.inputs)
    return outputs, {d: aligners[d](outputs[d]) for d in aligners}


def _normalized_l2(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s, t = s / s.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    return ((s - t) ** 2).sum(dim=1).mean()


def _kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    p_t = torch.softmax(t / temperature, dim=1)
    log_p_s = torch.log_softmax(s / temperature, dim=1)
    return (p_t * (p_t.log() - log_p_s)).sum(dim=1).mean() * temperature**2


def test_distillation_terms_and_weights() -> None:
    cfg = DistillConfig(
        feature_loss=Spec("l2"),
        lambda_feature={"a": 10.0},
        lambda_prediction={"b": 0.1},
        default_lambda=1.0,
    )
    tasks, student, aligners, batch, t_out = _setup()
    objective = Objective(tasks, cfg)
    assert objective.needs_teachers
    outputs, aligned = _forward(student, aligners, batch)
    bundle = objective(outputs, aligned, batch, t_out, step=25, total_steps=100)
    anneal = 0.75
    assert bundle.tasks == ["a", "b"] and not bundle.joint
    expected_total = torch.zeros(())
    for d, (wf, wp) in {"a": (10.0, 1.0), "b": (1.0, 0.1)}.items():
        assert distillation_weights(cfg, d) == (wf, wp)
        out = outputs[d]
        # every entry against the loss computed by hand from the raw outputs
        task = F.cross_entropy(out["pred"], batch.targets[d])
        feat = _normalized_l2(aligned[d][0], t_out[d]["features"])
        pred = _kl(out["pred"], t_out[d]["pred"], TEMPERATURE)
        torch.testing.assert_close(bundle.supervised[d], task)
        assert set(bundle.distill[d]) == {"feature", "prediction"}
        torch.testing.assert_close(bundle.distill[d]["feature"], anneal * wf * feat)
        torch.testing.assert_close(bundle.distill[d]["prediction"], anneal * wp * pred)
        # the detached log terms are the unweighted losses
        torch.testing.assert_close(bundle.logs[f"task/{d}"], task.detach())
        torch.testing.assert_close(bundle.logs[f"feature/{d}"], feat.detach())
        torch.testing.assert_close(bundle.logs[f"prediction/{d}"], pred.detach())
        torch.testing.assert_close(bundle.task_losses()[d], task + anneal * (wf * feat + wp * pred))
        expected_total = expected_total + task + anneal * (wf * feat + wp * pred)
    assert float(bundle.logs["anneal"]) == anneal
    torch.testing.assert_close(bundle.total().detach(), expected_total.detach())
    assert all(not value.requires_grad for value in bundle.logs.values())
    bundle.total().backward()
    assert all(p.grad is not None for p in aligners.parameters())


def test_task_weight_scales_the_supervised_loss() -> None:
    tasks, student, aligners, batch, _ = _setup()
    tasks["b"].weight = 0.5
    outputs, aligned = _forward(student, aligners, batch)
    bundle = Objective(tasks)(outputs, aligned, batch)
    task_b = F.cross_entropy(outputs["b"]["pred"], batch.targets["b"])
    torch.testing.assert_close(bundle.supervised["b"], 0.5 * task_b)
    torch.testing.assert_close(bundle.logs["task/b"], task_b.detach())  # logged unweighted


def test_annealed_to_zero_equals_task_loss() -> None:
    tasks, student, aligners, batch, t_out = _setup()
    outputs, aligned = _forward(student, aligners, batch)
    distilled = Objective(tasks, DistillConfig())(
        outputs, aligned, batch, t_out, step=10, total_steps=10
    )
    plain = Objective(tasks)(outputs, aligned, batch)
    assert not Objective(tasks).needs_teachers and not plain.distill
    for d in tasks:
        assert all(float(term.detach()) == 0.0 for term in distilled.distill[d].values())
        torch.testing.assert_close(distilled.supervised[d], plain.supervised[d])
    torch.testing.assert_close(distilled.total(), plain.total())


def test_distillation_needs_teachers() -> None:
    tasks, student, aligners, batch, _ = _setup()
    outputs, aligned = _forward(student, aligners, batch)
    with pytest.raises(ValueError, match="teachers"):
        Objective(tasks, DistillConfig())(outputs, aligned, batch, None)


# --------------------------------------------------------------------------------------------
# Dense runs

STREAM = "images"
CHANNELS = {"semantic": 5, "depth": 1, "normal": 3}


def _dense_tasks(**prediction_losses: tuple[str, dict]) -> dict[str, Task]:
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


TASKS = _dense_tasks()


def _dense_batch(b: int = 2, h: int = 32, w: int = 32, k: int = 5) -> Batch:
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


def _dense_net(seed: int = 0):
    torch.manual_seed(seed)
    return build_dense_network(
        "segnet", {"width_mult": 0.125}, CHANNELS, decoder_channels=8, unit_vector=["normal"]
    )


def _dense_teacher(task: str, seed: int):
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
    batch = _dense_batch()
    out = _dense_net()(batch.inputs)
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


def _normalized_l2_maps(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
    return (F.normalize(s, dim=1) - F.normalize(t, dim=1)).pow(2).sum(1).mean()


def test_distillation_objective_matches_url_by_hand() -> None:
    batch = _dense_batch()
    teachers = {t: _dense_teacher(t, i + 10) for i, t in enumerate(TASKS)}
    net = _dense_net()
    aligners = net.build_aligners({t: 6 for t in TASKS})
    out = net(batch.inputs)
    aligned = {t: aligners[t](out[t]) for t in aligners}
    with torch.no_grad():
        teacher_out = {t: m(batch.inputs)[t] for t, m in teachers.items()}
    tasks = _dense_tasks(semantic=("kl", {"temperature": 2.0}))
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
        feat = _normalized_l2_maps(bottleneck, t_feat) + _normalized_l2_maps(features, t_feat)
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
    batch = _dense_batch()
    net = _dense_net()
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
    batch = _dense_batch(b=5, k=5)
    images, targets = batch.inputs[STREAM], batch.targets
    samples = [
        {"image": images[i], **{t: v[i] for t, v in targets.items()}, "index": i} for i in range(5)
    ]
    net = _dense_net().eval()
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

    batch = _dense_batch(b=2, k=5)
    images, targets = batch.inputs[STREAM], batch.targets
    columns = {"ground truth": targets, "student": {**targets, "depth": targets["depth"] * 2}}
    render = {t: task.render for t, task in TASKS.items()}
    png = prediction_grid_figure(images, columns, ["semantic", "depth", "normal"], render)
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.height > picture.width  # 6 rows, 3 columns
