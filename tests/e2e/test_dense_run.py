"""Dense runs end to end: mini-scenes, NYUv2 and Cityscapes fixtures, evaluation, resume,
two processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from unirep.stage_one.keys import teacher_path
from unirep.stage_one.train import ensure_teachers

from tests.conftest import TINY_DENSE, tiny_dense_config
from unirep.config.schema import Config
from unirep.data.classification.decathlon import DataRootError
from unirep.data.dense.mtan import write_mtan_fixture
from unirep.data.streams import SCENE_STREAM
from unirep.errors import ConfigError
from unirep.io import file_sha256, load_weights
from unirep.objective import Objective
from unirep.pipeline.export import load_student
from unirep.pipeline.rundir import make_accelerator, prepare_run_dir
from unirep.pipeline.stage_two import distill, evaluate_student, resolve_data
from unirep.teachers.store import TeacherMismatchError
from unirep.training.trainer import DONE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MAIN_METRIC = {"semantic": "miou", "depth": "abs_err", "normal": "angle_mean"}
"""The metric of each dense task that enters Δm and selection (MTAN, URL)."""


def _run(cfg: Config) -> tuple[Path, dict]:
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    run_dir = prepare_run_dir(cfg, accelerator)
    seconds = ensure_teachers(cfg, accelerator, data, run_dir)
    return run_dir, distill(cfg, accelerator, data, run_dir, seconds)


def _evaluate(cfg: Config, student_dir: Path) -> dict:
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    eval_dir = prepare_run_dir(cfg, accelerator)
    return evaluate_student(cfg, accelerator, data, eval_dir, student_dir)


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
        "baseline_delta_m_all_metrics_vs_teachers",
        "num_processes",
        "params",
    ):
        assert key in s, key
    assert s["weighting"] == "sum" and s["num_processes"] == 1
    # the per-task values live in metrics["tasks"] only (no `<task>_<metric>` summary keys)
    assert not [k for k in s if k.split("_")[0] in metrics["tasks"]]
    assert s["delta_m_metrics"] == ["semantic/miou", "depth/abs_err", "normal/angle_mean"]
    # Δm recomputed by hand from the per-task numbers (undefined if a tiny teacher scores 0)
    assert s["delta_m_vs_teachers"] is not None
    for role, key in (
        ("student", "delta_m_vs_teachers"),
        ("baseline", "baseline_delta_m_vs_teachers"),
    ):
        terms = []
        for task, metric in MAIN_METRIC.items():
            value = metrics["tasks"][task][role][metric]
            ref = metrics["tasks"][task]["teacher"][metric]
            sign = 1 if metric == "miou" else -1
            terms.append(sign * (value - ref) / abs(ref))
        assert s[key] == pytest.approx(100 * sum(terms) / 3), role
    assert s["selection"]["student"]["split"] == "val"
    assert set(s["selection"]["student"]) == {"split", "best_step", "val_delta_m"}
    assert s["params"]["adapters"] > 0
    # export: no alignment adapters; manifests tie the student to its teachers
    weights = load_weights(run_dir / "student" / "model.safetensors")
    assert weights and not any("align" in k for k in weights)
    manifest = json.loads((run_dir / "student" / "manifest.json").read_text())
    assert set(manifest["teachers"]) == set(metrics["tasks"])
    assert manifest["format"] == "unirep-student/2"
    assert {t: r["kind"] for t, r in manifest["tasks"].items()} == {t: t for t in MAIN_METRIC}
    assert {t: r["main_metric"] for t, r in manifest["tasks"].items()} == MAIN_METRIC
    assert {r["stream"] for r in manifest["tasks"].values()} == {SCENE_STREAM}
    assert set(manifest["preprocessing"]) == {SCENE_STREAM}
    # a teacher's log is in the run that trained it (an earlier test may have trained them)
    logs = {p.name for p in (run_dir / "logs").glob("*.csv")}
    assert {"student.csv", "baseline.csv"} <= logs
    assert not logs - {"student.csv", "baseline.csv"} or "teacher-normal.csv" in logs
    # the 6 alignment adapters (2 per task) have their own optimizer (URL: Adam 1e-2)
    step = sorted((run_dir / "checkpoints" / "student").glob("step_*"))[-1]
    optim = torch.load(step / "optim.pt", weights_only=False)["optimizers"]
    assert len(optim) == 2
    assert len(optim[1]["state"]) == 6 and optim[1]["param_groups"][0]["initial_lr"] == 0.01
    # ... and are checkpointed with the student (resume), though never exported
    checkpointed = load_weights(step / "model.safetensors")
    assert len([k for k in checkpointed if k.startswith("aligners.")]) == 6
    step = sorted((run_dir / "checkpoints" / "baseline").glob("step_*"))[-1]
    assert len(torch.load(step / "optim.pt", weights_only=False)["optimizers"]) == 1
    report = (run_dir / "report.md").read_text()
    assert "qualitative.png" in report and "Δm against the teachers" in report
    assert "baseline (no distillation)" in report


def test_evaluate_reproduces_the_dense_run(
    scenes_run: tuple[Path, dict], tiny_cache: Path, tmp_path: Path
) -> None:
    run_dir, metrics = scenes_run
    again = _evaluate(tiny_dense_config(tiny_cache, tmp_path, "name=eval"), run_dir / "student")
    for task, entry in metrics["tasks"].items():
        assert again["tasks"][task]["student"] == pytest.approx(entry["student"])
        assert again["tasks"][task]["teacher"] == pytest.approx(entry["teacher"])
    assert again["summary"]["delta_m_vs_teachers"] == pytest.approx(
        metrics["summary"]["delta_m_vs_teachers"]
    )
    net, _ = load_student(run_dir / "student")
    assert net.tasks == ["semantic", "depth", "normal"]
    assert net.unit_vector == ["normal"]

    # a student exported by unirep 0.1 (format unirep-dense-student/1: tasks named by their
    # kind, one top-level preprocessing) loads and evaluates to the same numbers
    old_dir = tmp_path / "old-student"
    shutil.copytree(run_dir / "student", old_dir)
    manifest = json.loads((old_dir / "manifest.json").read_text())
    old = {
        "format": "unirep-dense-student/1",
        "unirep_version": "0.1.0",
        "preset": manifest["preset"],
        "architecture": manifest["architecture"],
        "tasks": {
            t: {"type": "dense", "out_channels": r["out_channels"], "main_metric": r["main_metric"]}
            for t, r in manifest["tasks"].items()
        },
        "class_names": manifest["tasks"]["semantic"]["class_names"],
        "preprocessing": manifest["preprocessing"][SCENE_STREAM],
        "teachers": manifest["teachers"],
        "selection": {"split": "val", "best_step": 4, "val_delta_m": 0.0},
        "weights_sha256": file_sha256(old_dir / "model.safetensors"),
    }
    (old_dir / "manifest.json").write_text(json.dumps(old))
    old_net, _ = load_student(old_dir)
    assert old_net.tasks == net.tasks and old_net.unit_vector == ["normal"]
    from_old = _evaluate(tiny_dense_config(tiny_cache, tmp_path, "name=eval-old"), old_dir)
    for task, entry in again["tasks"].items():
        assert from_old["tasks"][task] == entry  # same weights, same numbers, teachers found


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
    net, manifest = load_student(run_dir / "student")
    assert manifest["architecture"]["cross_task"] == cross
    assert (net.attention is not None) == (cross == "mtan")
    assert (net.exchange is not None) == (cross == "densemtl")
    if cross == "densemtl":  # 6 pairs × heads 2 × (min(16, 4)·min(24, 4))² tokens² × 4 bytes
        reduction = net.encoder.reductions[0]  # decoder features at the first stage's size
        pairs = len(net.exchange.tasks) * (len(net.exchange.tasks) - 1)
        per_image = pairs * net.exchange.attention_bytes(1, 32 // reduction, 48 // reduction)
        assert per_image == 6 * 2 * 16 * 16 * 4


def test_dense_resume_continues_an_interrupted_run(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full_dir, full = _run(tiny_dense_config(tiny_cache, tmp_path, "name=full", "baseline=false"))
    original = Objective.forward

    def crash_at_step_2(self, outputs, aligned, batch, teacher_outputs=None, step=0, total_steps=1):
        if step == 2 and self.distill is not None:  # the distilled student only
            raise KeyboardInterrupt("simulated interruption")
        return original(self, outputs, aligned, batch, teacher_outputs, step, total_steps)

    monkeypatch.setattr(Objective, "forward", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_dense_config(tiny_cache, tmp_path, "name=cut", "baseline=false"))
    cut = tmp_path / "cut" / "checkpoints" / "student"
    assert not (cut / DONE).exists() and (cut / "step_000002").is_dir()
    monkeypatch.setattr(Objective, "forward", original)
    resumed_dir, resumed = _run(
        tiny_dense_config(tiny_cache, tmp_path, "name=cut", "baseline=false", "resume=true")
    )
    a = load_weights(full_dir / "student" / "model.safetensors")
    b = load_weights(resumed_dir / "student" / "model.safetensors")
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert resumed["tasks"] == full["tasks"]


def test_teacher_of_another_architecture_is_refused(
    scenes_run: tuple[Path, dict], tiny_cache: Path, tmp_path: Path
) -> None:
    """Another architecture keys another teacher folder; a teacher of the old one copied into
    it is refused, naming its teacher.json and the architecture."""
    old = tiny_dense_config(tiny_cache, tmp_path)
    cfg = tiny_dense_config(tiny_cache, tmp_path, "name=other", "dense.decoder_channels=16")
    cfg.teachers.root = str(tmp_path / "teachers")
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    source, target = teacher_path(old, data, "depth"), teacher_path(cfg, data, "depth")
    assert source.name != target.name and (source / "teacher.json").is_file()
    shutil.copytree(source, target)
    with pytest.raises(TeacherMismatchError, match=r"teacher\.json.*decoder_channels"):
        ensure_teachers(cfg, accelerator, data, tmp_path / "other")


# --------------------------------------------------------------------------------------------
# Two processes: the gathered evaluation gives the one-process numbers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(script: str, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(ROOT / "scripts" / script), *args,
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.distributed
def test_two_processes_give_the_one_process_numbers(
    scenes_run: tuple[Path, dict], tiny_cache: Path, tmp_path: Path
) -> None:
    # batches of 2 per process: the 6 test scenes are 3 batches for 2 processes, so the sampler
    # pads the second shard with repeated scenes, which the gathered metrics must drop
    common = [*TINY_DENSE, f"data.cache_dir={tiny_cache}", f"output_dir={tmp_path}",
              "data.eval_batch_size=2"]  # fmt: skip
    # a whole 2-process run (baseline and student; the teachers of scenes_run are reused)
    result = _launch("distill.py", "--config", "mini-scenes", *common, "name=ddp",
                     "data.batch_size=2")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["summary"]["num_processes"] == 2
    step = sorted((tmp_path / "ddp" / "checkpoints" / "student").glob("step_*"))[-1]
    assert {p.name for p in step.glob("rng_*.pt")} == {"rng_0.pt", "rng_1.pt"}
    assert result.stdout.count("student Δm vs teachers") == 1  # only the main process reports
    student = tmp_path / "ddp" / "student"

    # its student and teachers evaluated here, in one process, give the numbers the 2-process
    # run reported: the same per-sample predictions, the repeated scenes dropped
    # (one CPU thread, as each launched process has: the thread count changes float sums)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _evaluate(
            tiny_dense_config(tiny_cache, tmp_path, "name=ev1", "data.eval_batch_size=2"), student
        )
    finally:
        torch.set_num_threads(threads)
    assert one["summary"]["num_processes"] == 1
    assert set(one["tasks"]) == set(ddp["tasks"]) == set(MAIN_METRIC)
    _same_numbers(ddp, one)
    # the teachers evaluated are those of scenes_run
    manifests = [
        json.loads((d / "manifest.json").read_text()) for d in (student, scenes_run[0] / "student")
    ]
    assert manifests[0]["teachers"] == manifests[1]["teachers"]

    # and the exported student evaluated by 2 processes (scripts/evaluate.py) agrees too
    two = _launch("evaluate.py", "--config", "mini-scenes", *common, "name=ev2",
                  "--student", str(student))  # fmt: skip
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    m2 = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert m2["summary"]["num_processes"] == 2
    _same_numbers(m2, one)
    assert m2["summary"]["delta_m_vs_teachers"] == pytest.approx(
        one["summary"]["delta_m_vs_teachers"], rel=1e-12
    )


def _same_numbers(two: dict, one: dict) -> None:
    """Student and teacher metrics of a 2-process evaluation equal the 1-process ones: exactly
    (confusion counts, and the normal angles gathered in split order), except the depth errors,
    whose float64 sums are added in another grouping (one gathered batch of 4 for two of 2):
    those agree to the last bits."""
    for task, entry in one["tasks"].items():
        for role in ("student", "teacher"):
            if task == "depth":
                expected = pytest.approx(entry[role], rel=1e-12, abs=1e-12)
                assert two["tasks"][task][role] == expected, (task, role)
            else:
                assert two["tasks"][task][role] == entry[role], (task, role)


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
    data = resolve_data(cfg, make_accelerator(cfg))
    train, val = data.datasets("train")[SCENE_STREAM], data.datasets("val")[SCENE_STREAM]
    test = data.datasets("test")[SCENE_STREAM]
    # validation carved from the training folder (1 of 10), test = MTAN's "val" folder
    assert len(val) == 1 and len(train) == 9
    assert not set(val.indices) & set(train.indices)
    assert len(test) == 5 and test.split == "val"
    (folder,) = (tmp_path / "teachers").glob("depth-*")
    manifest = json.loads((folder / "teacher.json").read_text())
    assert manifest["data"]["selection_split"] == "val" and manifest["data"]["num_samples"] == 9
    assert manifest["kind"] == "depth" and manifest["out_channels"] == 1


def test_cityscapes_preset_on_a_fixture(tiny_cache: Path, tmp_path: Path) -> None:
    _, metrics = _fixture_run(
        tiny_cache, tmp_path, "cityscapes", classes=7, with_normals=False, label_dir="label_7"
    )
    assert set(metrics["tasks"]) == {"semantic", "depth"}
    assert metrics["summary"]["delta_m_metrics"] == ["semantic/miou", "depth/abs_err"]
    assert not list((tmp_path / "teachers").glob("normal*"))


# --------------------------------------------------------------------------------------------
# Bad input: clear errors before anything is written


def test_mtan_source_needs_a_root(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = tiny_dense_config(tiny_cache, tmp_path, preset="nyuv2")
    with pytest.raises(ConfigError, match=r"data\.root"):
        resolve_data(cfg, make_accelerator(cfg))


def test_missing_folder_is_named(tiny_cache: Path, tmp_path: Path) -> None:
    write_mtan_fixture(tmp_path / "nyu", "train", 4, 32, 48, classes=13)
    cfg = tiny_dense_config(tiny_cache, tmp_path, f"data.root={tmp_path / 'nyu'}", preset="nyuv2")
    with pytest.raises(DataRootError, match=r"nyu/val"):
        resolve_data(cfg, make_accelerator(cfg))


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
        resolve_data(cfg, make_accelerator(cfg))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("dense.tasks.edges={loss: cross_entropy}", "dense.tasks.edges"),
        ("data.source=synthetic-decathlon", "not a dense data source"),
        ("classification.selection_metric=accuracy", "does not apply to dense runs"),
        ("dense.tasks.depth.loss=nope", "dense.tasks.depth.loss.name"),
        ("dense.cross_task=nope", "dense.cross_task.name"),
        ("dense.depth_kind=disparity", "dense.depth_kind"),
        ("dense.scales=[0.5]", "dense.scales"),
        ("classification.init_from_teacher=semantic", "init_from_teacher"),
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
        resolve_data(cfg, make_accelerator(cfg))


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
    net, _ = load_student(run_dir / "student")
    assert type(net.encoder).__name__ == "TimmDenseEncoder"
    assert set(metrics["tasks"]) == {"semantic", "depth", "normal"}


@pytest.mark.parametrize(
    ("preset", "fixture"),
    [
        ("nyuv2-onelabel", {"classes": 13}),
        ("nyuv2-random", {"classes": 13}),
        ("cityscapes-onelabel", {"classes": 7, "with_normals": False, "label_dir": "label_7"}),
    ],
)
def test_partial_label_presets_on_a_fixture(
    tiny_cache: Path, tmp_path: Path, preset: str, fixture: dict
) -> None:
    """The real-data partial presets run on fixtures in the exact MTAN format: the split covers
    the 9 training images (the carved validation image stays fully labelled), MTPSL trains."""
    run_dir, metrics = _fixture_run(tiny_cache, tmp_path, preset, **fixture)
    split = json.loads((run_dir / "label_split.json").read_text())
    assert len(split["labels"]) == 9 and split["tasks"] == list(metrics["tasks"])
    if "onelabel" in preset:
        assert all(sum(row) == 1 for row in split["labels"])
    else:
        assert all(0 < sum(row) < len(row) for row in split["labels"])
    summary = metrics["summary"]
    assert summary["partial"]["method"] == "mtpsl"
    assert summary["delta_m_vs_baseline"] is not None
    log = (run_dir / "logs" / "student.csv").read_text()
    assert "train/mtpsl/loss" in log
