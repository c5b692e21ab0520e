"""The objectives: a dict of terms, per-domain λ, linear annealing, gradients to the adapters."""

from __future__ import annotations

import pytest
import torch

from unirep.config import DistillConfig, Spec
from unirep.models.network import build_network
from unirep.objective import DistillationObjective, TaskObjective, annealing_factor


def test_annealing() -> None:
    assert annealing_factor("linear", 0, 100) == 1.0
    assert annealing_factor("linear", 50, 100) == 0.5
    assert annealing_factor("linear", 100, 100) == 0.0
    assert annealing_factor("none", 70, 100) == 1.0
    with pytest.raises(ValueError, match="cosine"):
        annealing_factor("cosine", 1, 2)


def _setup(cfg: DistillConfig):
    torch.manual_seed(0)
    student = build_network("resnet_decathlon_tiny", {}, {"a": 3, "b": 4}, adapter="linear")
    teachers = {
        d: build_network("resnet_decathlon_tiny", {}, {d: k}).eval()
        for d, k in (("a", 3), ("b", 4))
    }
    images = {"a": torch.randn(4, 3, 28, 28), "b": torch.randn(4, 3, 28, 28)}
    labels = {"a": torch.tensor([0, 1, 2, 0]), "b": torch.tensor([3, 1, 2, 0])}
    with torch.no_grad():
        t_out = {d: teachers[d]({d: x})[d] for d, x in images.items()}
    return student, images, labels, t_out


def test_distillation_terms_and_weights() -> None:
    cfg = DistillConfig(
        feature_loss=Spec("l2"),
        prediction_loss=Spec("kl", {"temperature": 2.0}),
        lambda_feature={"a": 10.0},
        lambda_prediction={"b": 0.1},
        default_lambda=1.0,
    )
    student, images, labels, t_out = _setup(cfg)
    objective = DistillationObjective(cfg)
    out = objective(student(images), labels, t_out, step=25, total_steps=100)
    expected = torch.zeros(())
    for d, (wf, wp) in {"a": (10.0, 1.0), "b": (1.0, 0.1)}.items():
        assert objective.weights(d) == (wf, wp)
        expected = (
            expected
            + out[f"task/{d}"]
            + 0.75 * (wf * out[f"feature/{d}"] + wp * out[f"prediction/{d}"])
        )
    torch.testing.assert_close(out["loss"].detach(), expected)
    for key, value in out.items():
        assert key == "loss" or not value.requires_grad
    out["loss"].backward()
    assert all(p.grad is not None for p in student.adapters.parameters())


def test_annealed_to_zero_equals_task_loss() -> None:
    cfg = DistillConfig()
    student, images, labels, t_out = _setup(cfg)
    outputs = student(images)
    distilled = DistillationObjective(cfg)(outputs, labels, t_out, step=10, total_steps=10)
    plain = TaskObjective(cfg)(outputs, labels)
    torch.testing.assert_close(distilled["loss"], plain["loss"])


def test_distillation_needs_teachers() -> None:
    cfg = DistillConfig()
    student, images, labels, _ = _setup(cfg)
    with pytest.raises(ValueError, match="teachers"):
        DistillationObjective(cfg)(student(images), labels, None)
