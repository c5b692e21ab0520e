"""metrics.json's summary: per-image sums from the evaluator become ``summary.uncertainty``, the
sums themselves stay out of ``metrics.json``, and a stored (JSON) evaluation gives the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from torch import nn

from tests.conftest import tiny_config, tiny_dense_config
from unirep.metrics.uncertainty import PER_IMAGE, per_image_record, split_value
from unirep.pipeline.results import build_metrics
from unirep.tasks import TASK_KINDS, Task
from unirep.training.evaluator import Evaluator, per_image_records, without_per_image

pytestmark = pytest.mark.usefixtures("one_thread")

KIND = TASK_KINDS.build("classification")
TASKS = {t: Task(t, KIND, t, num_classes=3) for t in ("a", "b")}
PARAMS = {"student": 10, "adapters": 1, "teachers_total": 20}


class _Lookup(nn.Module):
    """Predicts a fixed class per image (by its index): a network whose answers are known."""

    def __init__(self, answers: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.tasks = list(answers)
        self.answers = answers
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        (stream, images), = inputs.items()  # fmt: skip
        index = images[:, 0, 0, 0].long()
        logits = nn.functional.one_hot(self.answers[stream][index], 3).float()
        return {stream: {"pred": logits + 0 * self.dummy}}


def _samples(labels: list[int]) -> list[dict[str, Any]]:
    return [
        {"image": torch.full((1, 2, 2), float(i)), "label": y, "index": 100 + i}
        for i, y in enumerate(labels)
    ]


def _coin(n: int, p: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(int)


def _results(correct: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Evaluation results with per-image records, as ``evaluate(..., per_image=True)`` gives."""
    out = {}
    for task, c in correct.items():
        sums = torch.from_numpy(np.stack([c, np.ones_like(c)], 1))
        ids = torch.arange(len(c)) + (0 if task == "a" else 10_000)
        out[task] = {
            "accuracy": float(c.mean()),
            PER_IMAGE: per_image_record("accuracy", ids, sums),
        }
    return out


def test_the_evaluator_keeps_per_image_sums_only_when_asked() -> None:
    labels = {"a": [0, 1, 2, 0, 1], "b": [2, 2, 1, -1]}
    answers = {"a": torch.tensor([0, 1, 0, 0, 2]), "b": torch.tensor([2, 0, 1, 1])}
    datasets = {t: _samples(y) for t, y in labels.items()}
    evaluator = Evaluator(Accelerator(cpu=True), batch_size=2)
    plain = evaluator.evaluate(_Lookup(answers), "test", datasets, TASKS)
    assert plain == {"a": {"accuracy": 0.6}, "b": {"accuracy": pytest.approx(2 / 3)}}
    found = evaluator.evaluate(_Lookup(answers), "test", datasets, TASKS, per_image=True)
    assert without_per_image(found) == plain
    records = per_image_records(found)
    assert records["a"] == {
        "metric": "accuracy",
        "ids": [100, 101, 102, 103, 104],
        "sums": [[1, 1], [1, 1], [0, 1], [1, 1], [0, 1]],
    }
    assert records["b"]["sums"][-1] == [0, 0]  # unlabelled: neither right nor counted
    assert json.loads(json.dumps(found)) == found  # plain JSON: a stored evaluation keeps them


def test_build_metrics_measures_the_differences_and_writes_no_per_image_sums(
    tmp_path: Path,
) -> None:
    cfg = tiny_config(tmp_path, tmp_path)
    n = 600
    results = {
        "student": _results({"a": _coin(n, 0.86, 0), "b": _coin(n, 0.85, 1)}),
        "teacher": _results({"a": _coin(n, 0.85, 2), "b": _coin(n, 0.86, 3)}),
        "baseline": _results({"a": _coin(n, 0.60, 4), "b": _coin(n, 0.62, 5)}),
    }
    metrics = build_metrics(cfg, TASKS, 1, results, PARAMS)
    assert PER_IMAGE not in json.dumps(metrics["tasks"])
    assert metrics["tasks"]["a"]["student"] == {"accuracy": results["student"]["a"]["accuracy"]}
    u = metrics["summary"]["uncertainty"]
    assert set(u) == {"student_vs_baseline", "student_vs_teachers"}
    vs_baseline, vs_teachers = u["student_vs_baseline"], u["student_vs_teachers"]
    s = metrics["summary"]
    assert vs_teachers["difference"] == pytest.approx(
        100 * (s["mean_accuracy"] - s["teacher_mean_accuracy"])
    )
    assert vs_teachers["unit"] == "percentage points"
    assert vs_teachers["ci95"][0] < 0 < vs_teachers["ci95"][1]
    assert vs_teachers["verdict"] == "no clear difference"
    assert vs_baseline["verdict"] == "clearly better"
    assert set(vs_baseline["per_task"]) == {"a", "b"}
    assert 0 <= vs_baseline["per_task"]["a"]["mcnemar_p"] < 0.01
    # a resumed run reads its stored evaluations back from JSON: the same metrics.json
    stored = json.loads(json.dumps(results))
    assert build_metrics(cfg, TASKS, 1, stored, PARAMS) == metrics
    # evaluations without per-image sums (older runs): no uncertainty, the rest unchanged
    plain = {role: without_per_image(r) for role, r in results.items()}
    without = build_metrics(cfg, TASKS, 1, plain, PARAMS)
    assert "uncertainty" not in without["summary"]
    assert without["tasks"] == metrics["tasks"]
    assert {k: v for k, v in metrics["summary"].items() if k != "uncertainty"} == without["summary"]


def test_only_the_comparisons_with_sums_on_both_sides(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, tmp_path)
    student = _results({"a": _coin(50, 0.8, 0), "b": _coin(50, 0.8, 1)})
    teacher = without_per_image(_results({"a": _coin(50, 0.8, 2), "b": _coin(50, 0.8, 3)}))
    baseline = _results({"a": _coin(50, 0.8, 4), "b": _coin(50, 0.8, 5)})
    metrics = build_metrics(
        cfg, TASKS, 1, {"student": student, "teacher": teacher, "baseline": baseline}, PARAMS
    )
    assert set(metrics["summary"]["uncertainty"]) == {"student_vs_baseline"}


def test_dense_runs_give_delta_m_with_its_interval(tmp_path: Path) -> None:
    cfg = tiny_dense_config(tmp_path, tmp_path)
    tasks = {
        "semantic": Task("semantic", TASK_KINDS.build("semantic"), "image", num_classes=2),
        "depth": Task("depth", TASK_KINDS.build("depth"), "image"),
    }
    rng = np.random.default_rng(0)
    ids = torch.arange(30)

    def role(err_shift: float) -> dict[str, Any]:
        gt = rng.integers(50, 100, size=(30, 2))
        tp = (gt * rng.uniform(0.5, 0.9, size=(30, 2))).astype(int)
        pr = gt.copy()
        seg = torch.from_numpy(np.concatenate([tp, gt, pr], 1))
        err = torch.from_numpy(np.stack([rng.random(30) * 50 + err_shift, np.full(30, 100.0)], 1))
        seg_record = per_image_record("miou", ids, seg)
        err_record = per_image_record("abs_err", ids, err)
        return {
            "semantic": {
                "miou": float(split_value("miou", seg.numpy().sum(0))),
                "pixel_acc": 0.5,
                PER_IMAGE: seg_record,
            },
            "depth": {
                "abs_err": float(split_value("abs_err", err.numpy().sum(0))),
                "rel_err": 0.1,
                PER_IMAGE: err_record,
            },
        }

    results = {"student": role(0.0), "teacher": role(0.0)}
    metrics = build_metrics(cfg, tasks, 1, results, PARAMS)
    found = metrics["summary"]["uncertainty"]["student_vs_teachers"]
    assert found["unit"] == "%" and found["quantity"] == "Δm"
    assert found["difference"] == pytest.approx(metrics["summary"]["delta_m_vs_teachers"])
    assert found["ci95"][0] <= found["difference"] <= found["ci95"][1]
    assert set(found["per_task"]) == {"semantic", "depth"} and found["images"] == 30
