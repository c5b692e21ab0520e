"""The overlapping-label-sets preset end to end: tasks carved from the mini-decathlon, the pruned
auxiliary student beside the single-task teachers and the plain multi-task baseline, its export
evaluating to the run's numbers, a bit-exact resume of the joint phase and a 2-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_distributed import _launch, without_timings
from unirep.models.build import count_parameters
from unirep.pipeline.export import load_student
from unirep.pipeline.rundir import make_accelerator, prepare_run_dir
from unirep.pipeline.stage_two import evaluate_student, resolve_data
from unirep.pipeline.validate import load_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PRESET = "mini-decathlon-overlap"
TINY_OVERLAP = [
    "data.generator={seed: 0, image_size: 32, scale: 0.1}",  # toys: 2 training images a class
    "classification.overlap.samples_per_class=2",
    "data.batch_size=4",
    "data.eval_batch_size=64",
    "teachers.train.max_steps=6",
    "teachers.train.eval_every=3",
    "teachers.train.checkpoint_every=3",
    "teachers.train.log_every=2",
    "classification.sharing.kwargs={keep: 0.5, auxiliary_weight: 1.0, auxiliary_steps: 4}",
    "train.max_steps=6",
    "train.eval_every=3",
    "train.checkpoint_every=2",
    "train.log_every=2",
    "progress=false",
]
TASKS = {"objects_a", "objects_b", "toys_a", "toys_b"}


def _args(cache: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["--config", PRESET, *TINY_OVERLAP, f"data.cache_dir={cache}", f"output_dir={out}",
            f"name={name}", *extra]  # fmt: skip


def _distill(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """``scripts/distill.py args`` in one process (``env`` added, e.g. ``UNIREP_KILL_AT``)."""
    full = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **env}
    if "UNIREP_KILL_AT" not in env:
        full.pop("UNIREP_KILL_AT", None)
    command = [sys.executable, str(ROOT / "scripts" / "distill.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=full, timeout=600)


@pytest.fixture(scope="module")
def overlap_run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("overlap-runs")
    result = _distill(_args(tiny_cache, out, "run"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "run", json.loads((out / "run" / "metrics.json").read_text())


def test_a_run_gives_teachers_baseline_and_student_on_the_carved_tasks(
    overlap_run: tuple[Path, dict],
) -> None:
    run_dir, metrics = overlap_run
    assert set(metrics["tasks"]) == TASKS
    for entry in metrics["tasks"].values():
        assert {"teacher", "baseline", "student"} <= set(entry)
    s = metrics["summary"]
    carving = s["carving"]
    assert carving["union_classes"] == 25 and carving["samples_per_class"] == 2
    assert carving["shared_classes"]["objects_a"]["objects_b"] == 5
    assert all(t["images"]["train"] == 2 * len(t["classes"]) for t in carving["tasks"].values())
    sharing = s["sharing"]
    assert sharing["name"] == "pruned_auxiliary" and set(sharing["kept"]) == TASKS
    for kept in sharing["kept"].values():
        assert kept == {n: round(0.5 * w) for n, w in sharing["layers"].items()}
    assert 0 < sharing["overlap"]["objects_a"]["toys_b"] <= 1
    assert sharing["stages"][0]["phase"] == "student-auxiliary"
    assert sharing["stages"][0]["steps"] == 4
    assert s["phase_seconds"]["student"] > 0 and "baseline" in s["phase_seconds"]
    masks = json.loads((run_dir / "unit_masks" / "student.json").read_text())
    assert masks["kept"] == sharing["kept"] and masks["union"]["toys_b"][0] == 18
    assert (run_dir / "checkpoints" / "student-auxiliary").is_dir()
    assert "train/auxiliary/loss" in (run_dir / "logs" / "student.csv").read_text()
    assert "## What each task kept" in (run_dir / "report.md").read_text()
    net, manifest = load_student(run_dir / "student")
    assert manifest["architecture"]["sharing_kwargs"]["auxiliary_head"] is False
    assert net.auxiliary_head is None
    assert net.masks() == masks["masks"]  # the masks travel with the exported student
    assert s["params"]["student"] == count_parameters(net) < s["params"]["student_trained"]


def test_the_export_evaluates_to_the_runs_numbers(
    overlap_run: tuple[Path, dict], tiny_cache: Path, tmp_path: Path
) -> None:
    run_dir, metrics = overlap_run
    cfg = load_config(PRESET, _args(tiny_cache, tmp_path, "eval")[2:])
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    again = evaluate_student(
        cfg, accelerator, data, prepare_run_dir(cfg, accelerator), run_dir / "student"
    )
    for task, entry in metrics["tasks"].items():
        assert again["tasks"][task]["student"] == pytest.approx(entry["student"], abs=1e-6)


def test_the_joint_phase_killed_and_resumed_matches_an_uninterrupted_run(
    overlap_run: tuple[Path, dict], tiny_cache: Path, tmp_path: Path
) -> None:
    """SIGKILLed after step 3 of the joint phase (the auxiliary phase and the masks done), then
    resumed: the student and metrics.json equal an uninterrupted run's (timings aside)."""
    whole = _distill(_args(tiny_cache, tmp_path, "whole", "baseline=false"))
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-3000:]
    cut = _args(tiny_cache, tmp_path, "cut", "baseline=false")
    killed = _distill(cut, UNIREP_KILL_AT="step:student:3")
    assert killed.returncode != 0
    assert (tmp_path / "cut" / "unit_masks" / "student.json").is_file()
    assert not (tmp_path / "cut" / "metrics.json").exists()
    resumed = _distill([*cut, "resume=true"])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "[student] resumed from" in resumed.stdout

    a, b = tmp_path / "whole", tmp_path / "cut"
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (a, b)]
    assert without_timings(metrics[0], "inference") == without_timings(metrics[1], "inference")
    model = ("student", "model.safetensors")
    assert (a.joinpath(*model)).read_bytes() == (b.joinpath(*model)).read_bytes()


@pytest.mark.distributed
def test_two_processes_train_the_pruned_auxiliary_student(tiny_cache: Path, tmp_path: Path) -> None:
    result = _launch(29571, _args(tiny_cache, tmp_path, "ddp", "baseline=false"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["summary"]["num_processes"] == 2
    step = sorted((tmp_path / "ddp" / "checkpoints" / "student").glob("step_*"))[-1]
    assert {p.name for p in step.glob("rng_*.pt")} == {"rng_0.pt", "rng_1.pt"}
    masks = json.loads((tmp_path / "ddp" / "unit_masks" / "student.json").read_text())
    net, _ = load_student(tmp_path / "ddp" / "student")
    assert net.masks() == masks["masks"]
    assert set(metrics["tasks"]) == TASKS


def test_the_benchmark_times_the_joint_step_with_its_auxiliary_loss(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """``scripts/benchmark.py --variants overlap``: the pruned auxiliary network's joint step,
    its auxiliary loss attached as the pipeline attaches it, against plain multi-task learning."""
    from unirep.cli.benchmark import benchmark_variants
    from unirep.experiments.benchmark import term_costs

    variants = benchmark_variants("overlap")
    assert list(variants)[:2] == ["multi-task", "pruned-auxiliary"]
    names = ["multi-task", "pruned-auxiliary"]
    configs = {
        n: load_config(PRESET, [*_args(tiny_cache, tmp_path, "bench")[2:], *variants[n]])
        for n in names
    }
    rows = term_costs(configs, steps=1, warmup=1, untrained_teachers=True, spawn=False)
    assert rows["multi-task"]["ratio_step"] == pytest.approx(1.0)
    assert rows["pruned-auxiliary"]["ratio_step"] > 0
