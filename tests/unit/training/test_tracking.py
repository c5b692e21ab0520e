"""Experiment trackers (``log_with``): what goes to the CSV logs goes to the trackers too, under the
phase's name and at the phase's step, plus the final metrics; the choice is checked at start-up
and never changes what a run computes (teacher keys, resume, a finished run read back).

TensorBoard is tested offline by reading its event files back; wandb (offline mode) and MLflow
(a ``file:`` store) only when their packages are installed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from unirep.stage_one.keys import teacher_path
from unirep.stage_one.train import ensure_teachers

from tests.conftest import tiny_config
from unirep.errors import ConfigError
from unirep.pipeline.rundir import check_same_config, make_accelerator, prepare_run_dir
from unirep.pipeline.stage_two import distill, resolve_data
from unirep.pipeline.validate import load_config
from unirep.training import tracking
from unirep.training.tracking import PROJECT, final_values, read_curves

TASKS = ("digits", "objects", "textures")


def _run(cache: Path, out: Path, *extra: str) -> tuple[Path, dict[str, Any]]:
    """A tiny run, its trackers closed at the end (as the scripts do)."""
    cfg = tiny_config(cache, out, *extra)
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    run_dir = prepare_run_dir(cfg, accelerator)
    try:
        seconds = ensure_teachers(cfg, accelerator, data, run_dir)
        metrics = distill(cfg, accelerator, data, run_dir, seconds)
    finally:
        accelerator.end_training()
    return run_dir, metrics


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value)]}`` of the TensorBoard event files in ``folder``, as TensorBoard
    reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    reader.Reload()
    return {
        tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]
    }


def _expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every CSV series of the run as the trackers name it: ``<phase>/<series>``."""
    return {
        f"{phase}/{name}": points
        for phase, series in read_curves(run_dir / "logs").items()
        for name, points in series.items()
    }


def _same_points(got: list[tuple[int, float]], want: list[tuple[int, float]], tag: str) -> None:
    # the CSV keeps 6 significant digits, TensorBoard a float32
    assert [s for s, _ in got] == [s for s, _ in want], tag
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), tag


@pytest.fixture(scope="module")
def tensorboard_run(
    tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("runs")
    # its own teachers root: the teachers are trained (and logged) here, whatever ran before
    return _run(tiny_cache, out, "name=tb", "log_with=tensorboard",
                f"teachers.root={out / 'teachers'}")  # fmt: skip


@pytest.mark.slow
def test_tensorboard_holds_every_csv_series_and_the_final_metrics(
    tensorboard_run: tuple[Path, dict[str, Any]],
) -> None:
    run_dir, metrics = tensorboard_run
    scalars = _scalars(run_dir / "logs" / PROJECT)
    expected = _expected(run_dir)
    assert {"student/train/loss", "baseline/train/loss", "teacher-digits/train/loss"} <= set(
        expected
    )
    for task in TASKS:  # the effective task weights, per task
        assert f"student/train/weight/{task}" in expected
    final = {f"final/{k}": v for k, v in final_values(metrics).items()}
    assert set(scalars) == set(expected) | set(final)  # nothing more, nothing less
    for tag, points in expected.items():
        _same_points(scalars[tag], points, tag)
    assert "final/summary/mean_accuracy" in final
    assert "final/tasks/digits/student/accuracy" in final
    for tag, value in final.items():
        _same_points(scalars[tag], [(6, value)], tag)  # at the student's last step
    assert scalars["final/summary/mean_accuracy"][0][1] == pytest.approx(
        metrics["summary"]["mean_accuracy"], rel=1e-6
    )
    # the resolved config, flattened, as the run's hyper-parameters
    (stored,) = (run_dir / "logs" / PROJECT).glob("*/hparams.yml")
    hparams = yaml.safe_load(stored.read_text())
    assert hparams["log_with"] == "tensorboard" and hparams["train.max_steps"] == 6
    assert json.loads(hparams["classification.domains"]) == list(TASKS)


@pytest.mark.slow
def test_a_tracker_changes_nothing_the_run_computes(
    tensorboard_run: tuple[Path, dict[str, Any]], tiny_cache: Path
) -> None:
    run_dir, _ = tensorboard_run
    root = f"teachers.root={run_dir.parent / 'teachers'}"  # the run's own (tensorboard_run)
    plain = tiny_config(tiny_cache, run_dir.parent, "name=tb", "log_with=none", root)
    tracked = tiny_config(tiny_cache, run_dir.parent, "name=tb", "log_with=tensorboard", root)
    data = resolve_data(plain, make_accelerator(plain))
    for task in TASKS:  # the same cached teachers
        assert teacher_path(plain, data, task) == teacher_path(tracked, data, task)
    # the finished run reads back for the same config with another tracker (or none)
    check_same_config(plain, run_dir / "config.yaml", finished=True)
    # resume=true on it starts no tracker (no empty tracker run beside the finished one)
    folder = run_dir / "logs" / PROJECT
    before = sorted(folder.iterdir())
    again = tiny_config(
        tiny_cache, run_dir.parent, "name=tb", "log_with=tensorboard", "resume=true", root
    )
    accelerator = make_accelerator(again)
    assert prepare_run_dir(again, accelerator) == run_dir
    assert accelerator.trackers == [] and sorted(folder.iterdir()) == before


@pytest.mark.slow
def test_tensorboard_after_resume_matches_the_csv(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed before the student's step 5 with its last checkpoint at 3, then resumed: the CSV
    drops its step-4 rows and logs step 4 again; TensorBoard, which cannot drop what it was sent,
    gets step 4 a second time, the later point (the mean since the resume) equal to the CSV's."""
    pytest.importorskip("tensorboard")
    import unirep.training.trainer as trainer_module

    extra = ("name=resumed", "log_with=tensorboard", "train.checkpoint_every=3", "baseline=false")
    real = trainer_module.train_step

    def crashing(ctx: Any, step: int, timings: Any = None) -> Any:
        if ctx.phase == "student" and step == 4:
            raise KeyboardInterrupt
        return real(ctx, step, timings)

    monkeypatch.setattr(trainer_module, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_cache, tmp_path, *extra)
    monkeypatch.setattr(trainer_module, "train_step", real)
    run_dir, metrics = _run(tiny_cache, tmp_path, *extra, "resume=true")
    folder = run_dir / "logs" / PROJECT
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one per start
    scalars = _scalars(folder)
    expected = _expected(run_dir)
    assert [s for s, _ in expected["student/train/loss"]] == [2, 4, 6]
    assert set(scalars) == set(expected) | {f"final/{k}" for k in final_values(metrics)}
    assert [s for s, _ in scalars["student/train/loss"]] == [2, 4, 4, 6]
    for tag, points in expected.items():
        got = scalars[tag]
        repeated = [s for s, _ in got if [t for t, _ in got].count(s) > 1]
        assert set(repeated) <= ({4} if tag.startswith("student/train/") else set()), tag
        latest = dict(got)  # the later point of a step logged twice
        _same_points(sorted(latest.items()), points, tag)
    assert scalars["final/summary/mean_accuracy"] == [(6, pytest.approx(
        metrics["summary"]["mean_accuracy"], rel=1e-6))]  # fmt: skip


def test_log_with_is_checked_at_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = [f"output_dir={tmp_path}", f"data.cache_dir={tmp_path}"]
    with pytest.raises(ConfigError) as bad:
        load_config("mini-decathlon", [*base, "log_with=tensorbord"])
    message = str(bad.value)
    assert "\n" not in message and "'log_with'" in message
    assert all(choice in message for choice in ("none", "tensorboard", "wandb", "mlflow", "all"))
    monkeypatch.setitem(tracking.TRACKERS, "wandb", lambda: False)
    with pytest.raises(ConfigError, match=r"'log_with'.*unirep\[wandb\]") as missing:
        load_config("mini-decathlon", [*base, "log_with=wandb"])
    assert "\n" not in str(missing.value)
    for name in tracking.TRACKERS:
        monkeypatch.setitem(tracking.TRACKERS, name, lambda: False)
    with pytest.raises(ConfigError, match=r"'log_with': 'all' found none"):
        load_config("mini-decathlon", [*base, "log_with=all"])
    assert load_config("mini-decathlon", base).log_with == "none"


def test_final_values_are_the_numbers_of_metrics_json() -> None:
    metrics = {
        "preset": "p",
        "tasks": {"a": {"student": {"accuracy": 0.5, "miou": None}}},
        "summary": {
            "delta_m_vs_teachers": -1.5,
            "params": {"student": 10},
            "weighting": "sum",
            "delta_m_metrics": ["a/accuracy"],
            "decathlon_score_is_official": True,
        },
    }
    assert final_values(metrics) == {
        "tasks/a/student/accuracy": 0.5,
        "summary/delta_m_vs_teachers": -1.5,
        "summary/params/student": 10.0,
    }


class _FakeTracker:
    """Records what a tracker of accelerate's ``name`` is sent (and wandb's step metrics)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[tuple[dict[str, float], int | None]] = []
        self.metrics: list[tuple[str, str | None]] = []
        self.tracker = self  # wandb's run

    def log(self, values: dict[str, float], step: int | None = None) -> None:
        self.sent.append((values, step))

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.metrics.append((name, step_metric))


def test_each_tracker_gets_the_phase_prefix_and_step(tmp_path: Path) -> None:
    trackers = [_FakeTracker(n) for n in ("tensorboard", "wandb", "mlflow")]
    tensorboard, wandb, mlflow = trackers
    accelerator = type("Accelerator", (), {"trackers": trackers})()
    log = tracking.CSVLog(
        tmp_path, "student", True, trackers=tracking.TrackerLog(accelerator, "student")
    )
    log.log(4, {"train/loss": 0.5, "train/gradcos/a~b": -0.25})
    assert tracking.read_log(log.path) == [(4, "train/loss", 0.5), (4, "train/gradcos/a~b", -0.25)]
    named = {"student/train/loss": 0.5, "student/train/gradcos/a~b": -0.25}
    assert tensorboard.sent == [(named, 4)]
    assert wandb.metrics == [("student/step", None), ("student/*", "student/step")]
    assert wandb.sent == [({**named, "student/step": 4}, None)]  # wandb's own step only grows
    assert mlflow.sent == [({"student/train/loss": 0.5, "student/train/gradcos/a_b": -0.25}, 4)]
    quiet = tracking.CSVLog(
        tmp_path, "baseline", False, trackers=tracking.TrackerLog(object(), "b")
    )
    quiet.log(2, {"train/loss": 1.0})  # another process: neither the CSV nor a tracker
    assert not quiet.path.exists()


def test_no_tracker_makes_no_tracker_files(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_cache, tmp_path, "name=plain")
    accelerator = make_accelerator(cfg)
    assert accelerator.log_with == [] and accelerator.project_dir is None
    run_dir = prepare_run_dir(cfg, accelerator)
    assert accelerator.trackers == [] and not (run_dir / "logs").exists()


def _wandb_history(path: Path) -> list[dict[str, Any]]:
    """The rows a wandb run logged, from its offline ``run-*.wandb`` file: a LevelDB-style log
    (a 7-byte file header, 32 KiB blocks of records, each a 7-byte header (CRC, length, type:
    1 whole, 2 first, 3 middle, 4 last part) and its bytes) of ``wandb_internal_pb2.Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, block, pos, part = path.read_bytes(), 32768, 7, b""
    rows = []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        part = data if kind in (1, 2) else part + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(part)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return rows


@pytest.mark.slow
def test_wandb_offline_gets_each_phase_on_its_own_step(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every phase counts from step 1, and wandb drops a point whose step is below one it has
    seen: each phase's points carry its own step series (``<phase>/step``)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir, metrics = _run(tiny_cache, tmp_path, "name=wb", "log_with=wandb")
    wandb.teardown()  # its service may still be writing the run's file after finish()
    (stored,) = (run_dir / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    rows = _wandb_history(stored)
    got: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            phase = key.split("/")[0]
            if not key.startswith("_") and key != f"{phase}/step":
                got.setdefault(key, []).append((row[f"{phase}/step"], value))
    final = {f"final/{k}": [(6, v)] for k, v in final_values(metrics).items()}
    expected = {**_expected(run_dir), **final}
    assert set(got) == set(expected)
    for tag, points in expected.items():
        _same_points(got[tag], points, tag)


@pytest.mark.slow
def test_mlflow_file_store_holds_every_csv_series(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps it for tests like this
    run_dir, metrics = _run(tiny_cache, tmp_path, "name=ml", "log_with=mlflow")
    client = MlflowClient(store)
    (experiment,) = [e for e in client.search_experiments() if e.name == PROJECT]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "ml" and run.data.params["log_with"] == "mlflow"
    expected = _expected(run_dir)
    for tag, points in expected.items():
        name = tracking._MLFLOW_UNSAFE.sub("_", tag)
        history = sorted(
            (m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)
        )
        _same_points(history, points, tag)
    value = run.data.metrics["final/summary/mean_accuracy"]
    assert math.isclose(value, metrics["summary"]["mean_accuracy"], rel_tol=1e-9)


@pytest.mark.slow
def test_runs_in_one_process_get_their_own_tracker_runs(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_recipe`` (scripts/compare.py) runs several runs in one process: each finishes its
    trackers, so the next one's wandb run is its own."""
    wandb = pytest.importorskip("wandb")
    from tests.conftest import TINY
    from unirep.pipeline.api import run_recipe

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    base = [*TINY, f"data.cache_dir={tiny_cache}", f"output_dir={tmp_path}", "log_with=wandb"]
    for name in ("first", "second"):
        run_recipe("mini-decathlon", [*base, f"name={name}", "baseline=false"])
    wandb.teardown()  # its service may still be writing the runs' files after finish()
    for name in ("first", "second"):
        (stored,) = (tmp_path / name / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
        steps = [row["student/step"] for row in _wandb_history(stored) if "student/step" in row]
        assert steps == [2, 3, 4, 6, 6], name  # its own student only (val at 3 and 6)
