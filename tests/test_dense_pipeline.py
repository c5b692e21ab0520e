"""Dense runs end to end: mini-scenes, NYUv2 and Cityscapes fixtures, evaluation, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from teachers.dense import ensure_dense_teachers
from tests.conftest import tiny_dense_config
from unirep.config import Config, ConfigError
from unirep.data.decathlon import DataRootError
from unirep.data.dense import write_mtan_fixture
from unirep.dense_eval import MAIN_METRIC
from unirep.dense_pipeline import (
    distill_dense,
    evaluate_dense_student,
    load_dense_student,
    resolve_dense_data,
)
from unirep.io import load_weights
from unirep.pipeline import make_accelerator, prepare_run_dir
from unirep.teachers import TeacherMismatchError
from unirep.trainer import DONE

pytestmark = pytest.mark.slow


def _run(cfg: Config) -> tuple[Path, dict]:
    accelerator = make_accelerator(cfg)
    data = resolve_dense_data(cfg, accelerator)
    run_dir = prepare_run_dir(cfg, accelerator)
    seconds = ensure_dense_teachers(cfg, accelerator, data, run_dir)
    return run_dir, distill_dense(cfg, accelerator, data, run_dir, seconds)


@pytest.fixture(scope="module")
def scenes_run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dense-runs")
    return _run(tiny_dense_config(tiny_cache, out, "name=scenes"))


def test_mini_scenes_run_directory(scenes_run: tuple[Path, dict]) -> None:
    run_dir, metrics = scenes_run
    for name in (
        "config.yaml",
        "metrics.json",
        "report.md",
        "training_curves.png",
        "qualitative.png",
        "student/model.safetensors",
        "student/manifest.json",
    ):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert metrics["preset"] == "mini-scenes" and metrics["split"] == "test"
    assert set(metrics["tasks"]) == {"semantic", "depth", "normal"}
    for task, entry in metrics["tasks"].items():
        assert set(entry) == {"student", "teacher", "baseline"}
        for role in entry.values():
            assert role[MAIN_METRIC[task]] is not None
    sem = metrics["tasks"]["semantic"]["student"]
    assert 0.0 <= sem["miou"] <= 1.0 and 0.0 <= sem["pixel_acc"] <= 1.0
    normal = metrics["tasks"]["normal"]["student"]
    assert 0.0 <= normal["angle_median"] <= 180.0 and 0.0 <= normal["within_30"] <= 1.0
    s = metrics["summary"]
    for key in (
        "delta_m_vs_teachers",
        "baseline_delta_m_vs_teachers",
        "train_seconds",
        "delta_m_all_metrics_vs_teachers",
        "num_processes",
        "params",
    ):
        assert key in s, key
    assert s["delta_m_metrics"] == ["semantic/miou", "depth/abs_err", "normal/angle_mean"]
    # Δm recomputed by hand from the per-task numbers (undefined if a tiny teacher scores 0)
    assert s["delta_m_vs_teachers"] is not None
    terms = []
    for task, metric in MAIN_METRIC.items():
        value = metrics["tasks"][task]["student"][metric]
        ref = metrics["tasks"][task]["teacher"][metric]
        sign = 1 if metric == "miou" else -1
        terms.append(sign * (value - ref) / abs(ref))
    assert s["delta_m_vs_teachers"] == pytest.approx(100 * sum(terms) / 3)
    assert s["selection"]["student"]["split"] == "val"
    assert s["params"]["adapters"] > 0
    # export: no alignment adapters; manifests tie the student to its teachers
    weights = load_weights(run_dir / "student" / "model.safetensors")
    assert weights and not any(k.startswith("align") for k in weights)
    manifest = json.loads((run_dir / "student" / "manifest.json").read_text())
    assert set(manifest["teachers"]) == set(metrics["tasks"])
    assert (run_dir / "logs" / "teacher-normal.csv").is_file()
    # the 6 alignment adapters (2 per task) have their own optimizer (URL: Adam 1e-2)
    step = sorted((run_dir / "checkpoints" / "student").glob("step_*"))[-1]
    optim = torch.load(step / "optim.pt", weights_only=False)["optimizers"]
    assert len(optim) == 2
    assert len(optim[1]["state"]) == 6 and optim[1]["param_groups"][0]["initial_lr"] == 0.01
    step = sorted((run_dir / "checkpoints" / "baseline").glob("step_*"))[-1]
    assert len(torch.load(step / "optim.pt", weights_only=False)["optimizers"]) == 1
    report = (run_dir / "report.md").read_text()
    assert "qualitative.png" in report and "Δm against the teachers" in report
    assert "baseline (no distillation)" in report


def test_evaluate_reproduces_the_dense_run(
    scenes_run: tuple[Path, dict], tiny_cache: Path, tmp_path: Path
) -> None:
    run_dir, metrics = scenes_run
    cfg = tiny_dense_config(tiny_cache, tmp_path, "name=eval")
    accelerator = make_accelerator(cfg)
    data = resolve_dense_data(cfg, accelerator)
    eval_dir = prepare_run_dir(cfg, accelerator)
    again = evaluate_dense_student(cfg, accelerator, data, eval_dir, run_dir / "student")
    for task, entry in metrics["tasks"].items():
        assert again["tasks"][task]["student"] == pytest.approx(entry["student"])
        assert again["tasks"][task]["teacher"] == pytest.approx(entry["teacher"])
    assert again["summary"]["delta_m_vs_teachers"] == pytest.approx(
        metrics["summary"]["delta_m_vs_teachers"]
    )
    net, _ = load_dense_student(run_dir / "student")
    assert net.tasks == ["semantic", "depth", "normal"]


@pytest.mark.parametrize(
    ("cross", "extra"),
    [
        ("mtan", "dense.cross_task={name: mtan}"),
        ("densemtl", "dense.cross_task={name: densemtl, kwargs: {pool: 4, heads: 2}}"),
    ],
)
def test_cross_task_students_train(
    cross: str, extra: str, scenes_run: tuple[Path, dict], tiny_cache: Path, tmp_path: Path
) -> None:
    cfg = tiny_dense_config(tiny_cache, tmp_path, f"name={cross}", "baseline=false", extra)
    run_dir, metrics = _run(cfg)  # reuses the teachers of scenes_run (same architecture)
    s = metrics["summary"]
    assert s["cross_task"] == cross
    if cross == "densemtl":  # 6 pairs × heads 2 × (min(16, 4)·min(24, 4))² tokens² × 4 bytes
        assert s["cross_task_attention_bytes_per_image"] == 6 * 2 * 16 * 16 * 4
    net, manifest = load_dense_student(run_dir / "student")
    assert manifest["architecture"]["cross_task"] == cross
    assert (net.attention is not None) == (cross == "mtan")
    assert (net.exchange is not None) == (cross == "densemtl")


def test_dense_resume_continues_an_interrupted_run(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full_dir, full = _run(tiny_dense_config(tiny_cache, tmp_path, "name=full", "baseline=false"))
    from unirep import objective as objective_module

    cls = objective_module.DenseDistillationObjective
    original = cls.forward

    def crash_at_step_2(self, outputs, targets, teacher_outputs=None, step=0, total_steps=1):
        if step == 2:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, outputs, targets, teacher_outputs, step, total_steps)

    monkeypatch.setattr(cls, "forward", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_dense_config(tiny_cache, tmp_path, "name=cut", "baseline=false"))
    cut = tmp_path / "cut" / "checkpoints" / "student"
    assert not (cut / DONE).exists() and (cut / "step_000002").is_dir()
    monkeypatch.setattr(cls, "forward", original)
    resumed_dir, resumed = _run(
        tiny_dense_config(tiny_cache, tmp_path, "name=cut", "baseline=false", "resume=true")
    )
    a = load_weights(full_dir / "student" / "model.safetensors")
    b = load_weights(resumed_dir / "student" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert resumed["tasks"] == full["tasks"]


def test_teacher_of_another_architecture_is_refused(
    scenes_run: tuple[Path, dict], tiny_cache: Path, tmp_path: Path
) -> None:
    cfg = tiny_dense_config(tiny_cache, tmp_path, "name=other", "dense.decoder_channels=16")
    cfg.teachers.root = str(tiny_cache / "teachers")
    accelerator = make_accelerator(cfg)
    data = resolve_dense_data(cfg, accelerator)
    with pytest.raises(TeacherMismatchError, match=r"teacher\.json.*decoder_channels"):
        ensure_dense_teachers(cfg, accelerator, data, tmp_path / "other")


# --------------------------------------------------------------------------------------------
# The real benchmarks' presets on fixtures in the exact MTAN format


def _fixture_run(tiny_cache: Path, tmp_path: Path, preset: str, **fixture) -> tuple[Path, dict]:
    root = tmp_path / preset
    label_dir = fixture.get("label_dir", "label")
    for split, n in (("train", 10), ("val", 5)):
        write_mtan_fixture(root, split, n, 32, 48, seed=len(split), **fixture)
    cfg = tiny_dense_config(
        tiny_cache,
        tmp_path / "runs",
        "name=fx",
        f"data.root={root}",
        "data.num_workers=0",
        f"teachers.root={tmp_path / 'teachers'}",
        "data.batch_size=3",
        preset=preset,
    )
    assert cfg.dense is not None and cfg.dense.label_dir == label_dir
    return _run(cfg)


def test_nyuv2_preset_on_a_fixture(tiny_cache: Path, tmp_path: Path) -> None:
    _, metrics = _fixture_run(tiny_cache, tmp_path, "nyuv2", classes=13)
    assert set(metrics["tasks"]) == {"semantic", "depth", "normal"}
    cfg = tiny_dense_config(tiny_cache, tmp_path, f"data.root={tmp_path / 'nyuv2'}", preset="nyuv2")
    data = resolve_dense_data(cfg, make_accelerator(cfg))
    train, val = data.dataset("train"), data.dataset("val")
    # validation carved from the training folder (1 of 10), test = MTAN's "val" folder
    assert len(val) == 1 and len(train) == 9
    assert not set(val.indices) & set(train.indices)
    assert len(data.dataset("test")) == 5 and data.dataset("test").split == "val"
    manifest = json.loads((tmp_path / "teachers" / "nyuv2" / "depth" / "teacher.json").read_text())
    assert manifest["data"]["selection_split"] == "val" and manifest["data"]["num_samples"] == 9


def test_cityscapes_preset_on_a_fixture(tiny_cache: Path, tmp_path: Path) -> None:
    _, metrics = _fixture_run(
        tiny_cache, tmp_path, "cityscapes", classes=7, with_normals=False, label_dir="label_7"
    )
    assert set(metrics["tasks"]) == {"semantic", "depth"}
    assert metrics["summary"]["delta_m_metrics"] == ["semantic/miou", "depth/abs_err"]
    assert not (tmp_path / "teachers" / "cityscapes" / "normal").exists()


# --------------------------------------------------------------------------------------------
# Bad input: clear errors before anything is written


def test_mtan_source_needs_a_root(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = tiny_dense_config(tiny_cache, tmp_path, preset="nyuv2")
    with pytest.raises(ConfigError, match=r"data\.root"):
        resolve_dense_data(cfg, make_accelerator(cfg))


def test_missing_folder_is_named(tiny_cache: Path, tmp_path: Path) -> None:
    write_mtan_fixture(tmp_path / "nyu", "train", 4, 32, 48, classes=13)
    cfg = tiny_dense_config(tiny_cache, tmp_path, f"data.root={tmp_path / 'nyu'}", preset="nyuv2")
    with pytest.raises(DataRootError, match=r"nyu/val"):
        resolve_dense_data(cfg, make_accelerator(cfg))


def test_labels_beyond_num_classes_are_refused(tiny_cache: Path, tmp_path: Path) -> None:
    for split in ("train", "val"):
        write_mtan_fixture(tmp_path / "nyu", split, 4, 32, 48, classes=13)
    cfg = tiny_dense_config(
        tiny_cache,
        tmp_path,
        f"data.root={tmp_path / 'nyu'}",
        "dense.num_classes=5",
        preset="nyuv2",
    )
    with pytest.raises(ConfigError, match=r"dense.num_classes.*class id 12"):
        resolve_dense_data(cfg, make_accelerator(cfg))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("dense.tasks.edges={loss: cross_entropy}", "dense.tasks.edges"),
        ("data.source=synthetic-decathlon", "not a dense data source"),
        ("train.selection_metric=accuracy", "delta_m"),
        ("dense.tasks.depth.loss=nope", "dense.tasks.depth.loss.name"),
        ("dense.cross_task=nope", "dense.cross_task.name"),
        ("dense.depth_kind=disparity", "dense.depth_kind"),
        ("dense.scales=[0.5]", "dense.scales"),
        ("distill.init_from_teacher=semantic", "init_from_teacher"),
    ],
)
def test_bad_dense_config_names_the_key(
    tiny_cache: Path, tmp_path: Path, override: str, needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        tiny_dense_config(tiny_cache, tmp_path, override)


def test_mini_scenes_class_count_is_checked(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = tiny_dense_config(tiny_cache, tmp_path, "dense.num_classes=13")
    with pytest.raises(ConfigError, match="mini-scenes has 7 classes"):
        resolve_dense_data(cfg, make_accelerator(cfg))


def test_timm_encoder_student_and_teachers(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = tiny_dense_config(
        tiny_cache, tmp_path, "name=timm", "baseline=false",
        "dense.encoder={name: timm, kwargs: {model_name: resnet10t}}",
        f"teachers.root={tmp_path / 'teachers'}", "teachers.train.max_steps=2",
        "teachers.train.eval_every=2", "train.max_steps=2",
    )  # fmt: skip
    run_dir, metrics = _run(cfg)
    manifest = json.loads((run_dir / "student" / "manifest.json").read_text())
    assert manifest["architecture"]["encoder"] == "timm"
    assert manifest["architecture"]["encoder_kwargs"] == {"model_name": "resnet10t"}
    net, _ = load_dense_student(run_dir / "student")
    assert type(net.encoder).__name__ == "TimmDenseEncoder"
    assert set(metrics["tasks"]) == {"semantic", "depth", "normal"}
