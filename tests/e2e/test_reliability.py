"""Trust what a run wrote: non-finite values caught at their step, strict JSON, eval-mode
evaluation, run folders that belong to one config (issue "trust what it wrote")."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

import unirep.objective as objective_module
from tests.conftest import TINY, tiny_config
from unirep.errors import ConfigError, NonFiniteError, UnirepError
from unirep.io import atomic_write_json, load_weights, save_weights
from unirep.layout import BEST
from unirep.pipeline.rundir import prepare_run_dir
from unirep.pipeline.stage_two import resolve_data, student_phase
from unirep.tasks import TASK_KINDS, Task
from unirep.teachers.store import load_teacher, save_teacher
from unirep.training.checkpoint import latest_checkpoint
from unirep.training.evaluator import Evaluator
from unirep.training.trainer import fit

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["train.max_steps=6", "train.eval_every=2", "train.checkpoint_every=1"]


def _baseline(cache: Path, run_dir: Path, *extra: str):
    """A tiny baseline phase (no teachers), ready for :func:`fit`."""
    torch.set_num_threads(1)
    cfg = tiny_config(cache, run_dir, "classification.init_from_teacher=null", *STEPS, *extra)
    accelerator = Accelerator(cpu=True)
    data = resolve_data(cfg, accelerator)
    tasks = data.tasks()
    phase, _ = student_phase(cfg, accelerator, "baseline", data, tasks, run_dir, {}, None, False)
    return accelerator, phase, Evaluator(accelerator, cfg.data.eval_batch_size), tasks


def _poison_at(monkeypatch: pytest.MonkeyPatch, bad_step: int) -> None:
    """Make the first task's supervised loss NaN at (0-based) step ``bad_step``."""
    real = objective_module.Objective.forward

    def forward(self, outputs, aligned, batch, teacher_outputs, step, total_steps):
        bundle = real(self, outputs, aligned, batch, teacher_outputs, step, total_steps)
        if step == bad_step:
            task = next(iter(bundle.supervised))
            bundle.supervised[task] = bundle.supervised[task] * math.nan
            bundle.logs[f"task/{task}"] = bundle.supervised[task].detach()
        return bundle

    monkeypatch.setattr(objective_module.Objective, "forward", forward)


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_a_nan_loss_stops_at_its_step_naming_the_term(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _poison_at(monkeypatch, bad_step=2)
    accelerator, phase, evaluator, tasks = _baseline(tiny_cache, tmp_path)
    with pytest.raises(NonFiniteError) as info:
        fit(accelerator, phase, evaluator, progress=False)
    message = str(info.value)
    first = next(iter(tasks))
    assert "step 3" in message and f"'task/{first}'" in message
    assert message.index(f"task/{first}") < message.index("'loss'")  # the term first
    last = latest_checkpoint(phase.checkpoint_dir)
    assert last is not None and last.name == "step_000002"  # the last good one, intact
    assert _finite(load_weights(last / "model.safetensors"))
    assert _finite(load_weights(phase.checkpoint_dir / BEST))


def test_skip_mode_skips_and_counts_the_bad_step(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _poison_at(monkeypatch, bad_step=2)
    accelerator, phase, evaluator, _ = _baseline(tiny_cache, tmp_path, "train.on_nonfinite=skip")
    result = fit(accelerator, phase, evaluator, progress=False)
    assert result.skipped_steps == 1 and result.steps == 6
    assert _finite(phase.module.state_dict())
    done = json.loads((phase.checkpoint_dir / "done.json").read_text())
    assert done["skipped_steps"] == 1


def test_a_nan_gradient_with_a_finite_loss_names_the_parameter_group(
    tiny_cache: Path, tmp_path: Path
) -> None:
    accelerator, phase, evaluator, _ = _baseline(tiny_cache, tmp_path)
    first = next(phase.module.student.trunk.parameters())
    first.register_hook(lambda g: torch.full_like(g, math.inf))
    with pytest.raises(NonFiniteError, match=r"step 1: non-finite gradient of 'student\.backbone'"):
        fit(accelerator, phase, evaluator, progress=False)


def test_a_non_finite_validation_score_is_never_selected(tiny_cache: Path, tmp_path: Path) -> None:
    accelerator, phase, evaluator, _ = _baseline(tiny_cache, tmp_path)
    scores = iter([math.nan, 0.25, math.inf])
    phase.score = lambda results: next(scores)
    result = fit(accelerator, phase, evaluator, progress=False)
    assert (result.best_step, result.best_val) == (4, 0.25)

    accelerator, phase, evaluator, _ = _baseline(tiny_cache, tmp_path / "all-nan")
    phase.score = lambda results: math.nan
    with pytest.raises(NonFiniteError, match="no validation score was finite"):
        fit(accelerator, phase, evaluator, progress=False)
    assert not (phase.checkpoint_dir / BEST).exists()


def _one_task() -> tuple[Task, nn.Module]:
    from unirep.models.build import build_network

    task = Task("digits", TASK_KINDS.build("classification"), "digits", num_classes=3)
    arch = {"backbone": "resnet_decathlon_tiny", "backbone_kwargs": {}}
    return task, build_network(arch, {"digits": task})


def test_teachers_with_non_finite_weights_are_never_saved_nor_loaded(tmp_path: Path) -> None:
    task, net = _one_task()
    arch = {"backbone": "resnet_decathlon_tiny", "backbone_kwargs": {}}
    kwargs = dict(architecture=arch, preprocessing={}, data={}, val_metrics={}, training={})
    save_teacher(tmp_path / "good", net, task, **kwargs)
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] = math.nan
    with pytest.raises(NonFiniteError, match="not saved"):
        save_teacher(tmp_path / "bad", net, task, **kwargs)
    assert not (tmp_path / "bad").exists()
    # a NaN written behind unirep's back (manifest hash updated to match) is refused at load
    good = tmp_path / "good"
    state = {k: v.clone() for k, v in net.state_dict().items()}
    from safetensors.torch import save_file

    from unirep.io import file_sha256

    save_file(state, str(good / "model.safetensors"))
    manifest = json.loads((good / "teacher.json").read_text())
    manifest["weights_sha256"] = file_sha256(good / "model.safetensors")
    (good / "teacher.json").write_text(json.dumps(manifest))
    with pytest.raises(NonFiniteError, match="cannot be used"):
        load_teacher(good, task)


def test_weights_with_nan_are_never_written(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError, match="'w'"):
        save_weights(tmp_path / "w.safetensors", {"w": torch.tensor([1.0, math.inf])})
    assert not list(tmp_path.iterdir())


def test_json_is_strict() -> None:
    path = Path(__file__).parent / ".strict.json.test"
    try:
        atomic_write_json(path, {"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})
        text = path.read_text()

        def refuse(token: str) -> None:
            raise AssertionError(f"non-standard JSON token {token}")

        assert json.loads(text, parse_constant=refuse) == {
            "a": None,
            "b": [None, 1.5],
            "c": {"d": None},
        }
    finally:
        path.unlink(missing_ok=True)


def test_evaluation_never_changes_batchnorm_statistics(tiny_cache: Path, tmp_path: Path) -> None:
    _, phase, evaluator, tasks = _baseline(tiny_cache, tmp_path)
    net = phase.module.student
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    evaluator.evaluate(net, "val", phase.val_sets, tasks)
    assert net.training  # the caller's mode comes back
    after = net.state_dict()
    assert any("running_mean" in k for k in after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_overwrite_replaces_a_run_and_a_foreign_folder_is_refused(
    tiny_cache: Path, tmp_path: Path
) -> None:
    accelerator = Accelerator(cpu=True)
    run = prepare_run_dir(tiny_config(tiny_cache, tmp_path, "name=x"), accelerator)
    (run / "metrics.json").write_text("{}")
    again = prepare_run_dir(
        tiny_config(tiny_cache, tmp_path, "name=x", "overwrite=true"), accelerator
    )
    assert again == run and not (run / "metrics.json").exists() and (run / "config.yaml").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run")
    with pytest.raises(ConfigError, match="not a unirep run folder"):
        prepare_run_dir(
            tiny_config(tiny_cache, tmp_path, "name=mine", "overwrite=true"), accelerator
        )
    assert (foreign / "notes.txt").exists()


def test_every_user_error_is_a_unirep_error() -> None:
    from unirep.data.classification.decathlon import CorruptImageError, DataRootError
    from unirep.errors import DataError
    from unirep.teachers.store import TeacherMismatchError

    for error in (ConfigError, DataError, DataRootError, CorruptImageError, TeacherMismatchError,
                  NonFiniteError):  # fmt: skip
        assert issubclass(error, UnirepError)


@pytest.mark.slow
def test_a_huge_learning_rate_stops_the_script_with_one_line(tmp_path: Path) -> None:
    """The real script: NaN from a huge learning rate is caught at its step, one line, exit 1,
    and metrics.json is never written."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "distill.py"), *TINY,
         "train.optim.optimizer.kwargs={lr: 1.0e+30, momentum: 0.9}",
         f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'runs'}", "name=nan"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert last.startswith("distill.py: error: [baseline] step ") and "non-finite" in last, last
    assert not (tmp_path / "runs" / "nan" / "metrics.json").exists()


@pytest.mark.slow
def test_an_unlabelled_test_split_gives_a_submission_and_exits_0(tmp_path: Path) -> None:
    """Visual Decathlon's stripped test annotations (the documented way to a submission): both
    scripts finish, write results.json, and the report says the split is unlabelled."""
    from tests.decathlon_fixture import SIZES, write_official_fixture

    root = write_official_fixture(tmp_path / "decathlon-1.0", labelled_test=False)
    common = [
        "--config", "decathlon", f"data.root={root}", "classification.domains=[imagenet12, dtd]",
        "classification.backbone=resnet_decathlon_tiny", "data.batch_size=4",
        "classification.batch_sizes={}",
        "data.eval_batch_size=16", "progress=false", f"data.cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'runs'}",
        *[f"{phase}.{key}=2"
          for phase in ("teachers.train", "classification.finetune_train", "train")
          for key in ("max_steps", "eval_every", "checkpoint_every")],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "scripts" / script), *common, *args],
            capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
        )  # fmt: skip

    trained = launch("distill.py", "name=vd")
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = tmp_path / "runs" / "vd"
    assert "student Δm vs teachers – %" in trained.stdout
    report = (run / "report.md").read_text()
    assert "## The test split is unlabelled" in report
    entries = json.loads((run / "results.json").read_text())
    assert len(entries) == 2 * SIZES["test"] == len({e["image_id"] for e in entries})
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tasks"]["dtd"]["student"]["accuracy"] is None

    evaluated = launch("evaluate.py", "--student", str(run), "split=test")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "not measured (unlabelled split)" in evaluated.stdout
    out = tmp_path / "runs" / "eval-vd-test"
    assert json.loads((out / "results.json").read_text()) == entries


def test_the_teacher_cache_is_keyed_by_what_determines_a_teacher(
    tiny_cache: Path, tmp_path: Path
) -> None:
    from unirep.stage_one.keys import teacher_path

    def path(task: str, *extra: str) -> Path:
        cfg = tiny_config(tiny_cache, tmp_path, *extra)
        assert cfg.classification is not None
        assert cfg.classification.finetune_from == "objects"  # digits is fine-tuned from objects
        return teacher_path(cfg, resolve_data(cfg, Accelerator(cpu=True)), task)

    base = path("digits")
    assert base.name.startswith("digits-")
    assert path("digits", "progress=true", "name=other", "train.max_steps=9") == base
    changes = [
        "classification.finetune_train.max_steps=7",
        "classification.finetune_train.optim.optimizer.kwargs={lr: 0.2}",
        "teachers.train.max_steps=7",  # the recipe of objects, which digits starts from
        "seed=1",
        "classification.crop=24",
        "data.batch_size=4",
        "classification.backbone=resnet18",
        "classification.task_loss={name: cross_entropy, kwargs: {label_smoothing: 0.1}}",
    ]
    for change in changes:
        assert path("digits", change) != base, change
    source = path("objects")
    assert path("objects", "classification.finetune_train.max_steps=7") == source


@pytest.mark.slow
def test_skipped_corrupt_files_are_listed_in_metrics_and_report(
    tiny_cache: Path, tmp_path: Path
) -> None:
    import shutil

    from unirep.stage_one.train import ensure_teachers

    from unirep.pipeline.stage_two import distill

    generated = tiny_config(tiny_cache, tmp_path)
    src = resolve_data(generated, Accelerator(cpu=True)).root
    root = tmp_path / "copy"
    shutil.copytree(src, root)
    broken = sorted((root / "data" / "objects" / "val").glob("*"))[0]
    broken.write_bytes(b"not a jpeg")
    cfg = tiny_config(
        tiny_cache, tmp_path, "data.source=decathlon", f"data.root={root}",
        "data.on_corrupt=skip", f"teachers.root={tmp_path / 'teachers'}", "name=skip",
    )  # fmt: skip
    accelerator = Accelerator(cpu=True)
    data = resolve_data(cfg, accelerator)
    run_dir = prepare_run_dir(cfg, accelerator)
    distill(cfg, accelerator, data, run_dir, ensure_teachers(cfg, accelerator, data, run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (entry,) = metrics["summary"]["skipped_files"]
    assert entry["path"].endswith(str(broken.relative_to(root))) and entry["split"] == "val"
    report = (run_dir / "report.md").read_text()
    assert "Files skipped as corrupt" in report and broken.name in report
