"""End to end on the tiny benchmark: run-directory contract, evaluation, resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from unirep.stage_one.keys import teacher_path
from unirep.stage_one.train import ensure_teachers

from tests.conftest import tiny_config
from unirep.data.classification.decathlon import DataRootError
from unirep.errors import ConfigError
from unirep.io import load_weights
from unirep.layout import BEST, DONE
from unirep.models.build import build_network
from unirep.pipeline.export import STUDENT_FORMAT, student_tasks
from unirep.pipeline.rundir import make_accelerator, prepare_run_dir
from unirep.pipeline.stage_two import build_metrics, distill, evaluate_student, resolve_data
from unirep.tasks import TASK_KINDS, Task
from unirep.teachers.store import TeacherMismatchError, teacher_root

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _run(cache: Path, out: Path, *extra: str) -> tuple[Path, dict]:
    cfg = tiny_config(cache, out, *extra)
    accelerator = make_accelerator(cfg)
    run_dir = prepare_run_dir(cfg, accelerator)
    data = resolve_data(cfg, accelerator)
    seconds = ensure_teachers(cfg, accelerator, data, run_dir)
    return run_dir, distill(cfg, accelerator, data, run_dir, seconds)


@pytest.fixture(scope="module")
def finished_run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs")
    # its own teachers root: the run trains (and logs) its teachers, whatever ran before
    return _run(tiny_cache, out, "name=e2e", f"teachers.root={out / 'teachers'}")


def test_run_directory_contract(finished_run: tuple[Path, dict]) -> None:
    run_dir, metrics = finished_run
    for name in (
        "config.yaml",
        "metrics.json",
        "report.md",
        "training_curves.png",
        "per_task_metrics.png",
        "student/model.safetensors",
        "student/manifest.json",
    ):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert metrics["preset"] == "mini-decathlon" and metrics["split"] == "test"
    assert set(metrics["tasks"]) == {"digits", "objects", "textures"}
    for task in metrics["tasks"].values():
        assert set(task) == {"student", "teacher", "baseline"}
        for role in task.values():
            assert 0.0 <= role["accuracy"] <= 1.0
    summary = metrics["summary"]
    for key in (
        "delta_m_vs_teachers",
        "delta_m_all_metrics_vs_teachers",
        "decathlon_score",
        "train_seconds",
        "num_processes",
        "baseline_delta_m_vs_teachers",
        "mean_accuracy",
        "teacher_mean_accuracy",
    ):
        assert key in summary, key
    assert summary["num_processes"] == 1 and summary["weighting"] == "sum"
    assert summary["delta_m_metrics"] == [f"{t}/accuracy" for t in metrics["tasks"]]
    assert summary["params"]["student"] > 0 and summary["params"]["teachers_total"] > 0
    assert summary["selection"]["student"]["split"] == "val"
    # the export holds only the student's state (the checkpoints of the phase's trainable module
    # also hold its alignment adapters); the manifest ties it to its teachers
    manifest = json.loads((run_dir / "student" / "manifest.json").read_text())
    assert manifest["format"] == STUDENT_FORMAT
    weights = load_weights(run_dir / "student" / "model.safetensors")
    student = build_network(manifest["architecture"], student_tasks(manifest))
    assert set(weights) == set(student.state_dict())
    checkpoint = load_weights(
        run_dir / "checkpoints" / "student" / "step_000004" / "model.safetensors"
    )
    assert {k for k in checkpoint if k.startswith("student.")} == {f"student.{k}" for k in weights}
    assert any(k.startswith("aligners.") for k in checkpoint)
    assert summary["params"]["adapters"] > 0
    for name, task in manifest["tasks"].items():
        assert task["kind"] == "classification" and task["stream"] == name
        assert set(manifest["preprocessing"][name]) >= {"resize", "crop", "mean", "std"}
    assert set(manifest["teachers"]) == set(metrics["tasks"])
    assert all(len(t["weights_sha256"]) == 64 for t in manifest["teachers"].values())
    # checkpoints: latest k kept, best and done records; logs per phase
    steps = sorted(p.name for p in (run_dir / "checkpoints" / "student").glob("step_*"))
    assert steps == ["step_000002", "step_000004"]
    assert (run_dir / "checkpoints" / "student" / BEST).is_file()
    assert (run_dir / "logs" / "student.csv").is_file()
    assert (run_dir / "logs" / "teacher-digits.csv").is_file()
    report = (run_dir / "report.md").read_text()
    assert "training_curves.png" in report and "digits" in report


def test_evaluate_reproduces_the_run(
    finished_run: tuple[Path, dict], tiny_cache: Path, tmp_path: Path
) -> None:
    run_dir, metrics = finished_run
    root = f"teachers.root={run_dir.parent / 'teachers'}"  # the run's teachers (finished_run)
    cfg = tiny_config(tiny_cache, tmp_path, "name=eval", root)
    accelerator = make_accelerator(cfg)
    eval_dir = prepare_run_dir(cfg, accelerator)
    data = resolve_data(cfg, accelerator)
    again = evaluate_student(cfg, accelerator, data, eval_dir, run_dir / "student")
    for domain, task in metrics["tasks"].items():
        assert again["tasks"][domain]["student"] == pytest.approx(task["student"])
        assert again["tasks"][domain]["teacher"] == pytest.approx(task["teacher"])
    assert (eval_dir / "metrics.json").is_file()
    # the submission file: every test image once, official-style global ids, scores as metrics
    entries = json.loads((eval_dir / "results.json").read_text())
    truth = {}
    for domain in metrics["tasks"]:
        path = data.root / "annotations" / f"{domain}_test.json"
        annotations = json.loads(path.read_text())["annotations"]
        truth.update({a["image_id"]: (domain, a["category_id"]) for a in annotations})
    assert sorted(e["image_id"] for e in entries) == sorted(truth)
    for domain, task in metrics["tasks"].items():
        mine = [e for e in entries if truth[e["image_id"]][0] == domain]
        correct = sum(e["category_id"] == truth[e["image_id"]][1] for e in mine)
        assert correct / len(mine) == pytest.approx(task["student"]["accuracy"])


def test_evaluate_uses_the_students_preprocessing_and_a_new_folder(
    finished_run: tuple[Path, dict], tiny_cache: Path
) -> None:
    """scripts/evaluate.py given the run's own config.yaml and another preset's preprocessing:
    the training run is untouched, the student is preprocessed as its manifest records (so the
    run's numbers come back), and the results go to a new eval- folder."""
    run_dir, metrics = finished_run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--config",
         str(run_dir / "config.yaml"), "--student", str(run_dir), "classification.resize=40",
         "classification.crop=36"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "recorded preprocessing is used (resize 32 instead of 40, crop 28 instead of 36)" in (
        result.stdout
    )
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before
    out = run_dir.parent / f"eval-{run_dir.name}-test"
    again = json.loads((out / "metrics.json").read_text())
    for domain, task in metrics["tasks"].items():
        assert again["tasks"][domain]["student"] == pytest.approx(task["student"])
    second = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--config",
         str(run_dir / "config.yaml"), "--student", str(run_dir), f"name={run_dir.name}"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert second.returncode == 1 and "training run" in second.stderr.strip().splitlines()[-1]
    assert "Traceback" not in second.stderr


def test_resume_continues_an_interrupted_run(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an uninterrupted run, then the same run killed after step 4 and resumed
    full_dir, full = _run(tiny_cache, tmp_path, "name=full", "baseline=false")
    from unirep.objective import Objective

    original = Objective.forward

    def crash_at_step_4(self, outputs, aligned, batch, teacher_outputs=None, step=0, total_steps=1):
        if step == 4 and self.distill is not None:  # the distilled student's phase only
            raise KeyboardInterrupt("simulated interruption")
        return original(self, outputs, aligned, batch, teacher_outputs, step, total_steps)

    monkeypatch.setattr(Objective, "forward", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_cache, tmp_path, "name=cut", "baseline=false")
    cut = tmp_path / "cut" / "checkpoints" / "student"
    assert not (cut / DONE).exists() and (cut / "step_000004").is_dir()
    monkeypatch.setattr(Objective, "forward", original)
    with pytest.raises(ConfigError, match="baseline"):  # resuming with another config is refused
        _run(tiny_cache, tmp_path, "name=cut", "resume=true")
    resumed_dir, resumed = _run(tiny_cache, tmp_path, "name=cut", "baseline=false", "resume=true")
    a = load_weights(full_dir / "student" / "model.safetensors")
    b = load_weights(resumed_dir / "student" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert resumed["tasks"] == full["tasks"]
    steps = [
        line.split(",")[0]
        for line in (cut.parent.parent / "logs" / "student.csv").read_text().splitlines()[1:]
    ]
    assert steps == sorted(steps, key=int)  # no repeated steps in the log after resume


def test_missing_data_root_names_path_and_layout(tiny_cache: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "decathlon-1.0"
    cfg = tiny_config(tiny_cache, tmp_path, "data.source=decathlon", f"data.root={missing}")
    with pytest.raises(DataRootError) as info:
        resolve_data(cfg, make_accelerator(cfg))
    assert str(missing) in str(info.value) and "annotations" in str(info.value)


def test_teacher_of_another_domain_is_refused(
    finished_run: tuple[Path, dict], tiny_cache: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_cache, tmp_path, f"teachers.root={tmp_path / 'teachers'}")
    shutil.copytree(teacher_root(tiny_config(tiny_cache, tmp_path)), teacher_root(cfg))
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    target = teacher_path(cfg, data, "textures")
    shutil.rmtree(target)
    shutil.copytree(teacher_path(cfg, data, "digits"), target)
    with pytest.raises(TeacherMismatchError) as info:
        ensure_teachers(cfg, accelerator, data, tmp_path)
    assert str(target / "teacher.json") in str(info.value)


def test_metrics_with_a_zero_teacher_leave_delta_m_undefined(
    tiny_cache: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_cache, tmp_path)
    kind = TASK_KINDS.build("classification")
    tasks = {t: Task(t, kind, t, num_classes=2) for t in ("a", "b")}
    results = {
        "student": {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.5}},
        "teacher": {"a": {"accuracy": 0.0}, "b": {"accuracy": 0.5}},
    }
    params = {"student": 1, "adapters": 0, "teachers_total": 2}
    metrics = build_metrics(cfg, tasks, 1, results, params)
    assert metrics["summary"]["delta_m_vs_teachers"] is None
    assert metrics["summary"]["delta_m_all_metrics_vs_teachers"] is None
    assert metrics["summary"]["decathlon_score"] == pytest.approx(
        250 * 1.5**2 + 250
    )  # E_max = 2 × teacher error
