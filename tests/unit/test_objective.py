"""The objective: per-task bundle entries, per-task λ, annealing, gradients to the aligners."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unirep.batch import Batch
from unirep.config.schema import DistillConfig, Spec
from unirep.models.build import build_network
from unirep.objective import Objective, annealing_factor, distillation_weights
from unirep.tasks import TASK_KINDS, Task

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
