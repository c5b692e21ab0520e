"""The benchmark times the trainer's own step, for any weighting and either kind of run.

The figures must be finite and positive for every part of the split (data, teachers, step,
validation, checkpoint); the numbers themselves go to the README.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from unirep.stage_one.train import ensure_teachers

import unirep.training.trainer
from tests.conftest import TINY_DENSE, tiny_config, tiny_dense_config
from unirep.config.schema import Config
from unirep.experiments.benchmark import (
    format_report,
    format_weighting_costs,
    measure,
    run_benchmark,
    teacher_config,
    weighting_configs,
    weighting_costs,
    weighting_variants,
)
from unirep.pipeline.rundir import make_accelerator
from unirep.pipeline.stage_two import resolve_data
from unirep.pipeline.validate import load_config
from unirep.weighting.aggregators import NashMTL

ROOT = Path(__file__).resolve().parents[3]
FAST_DENSE_TEACHERS = [
    "teachers.train.max_steps=2",
    "teachers.train.eval_every=2",
    "teachers.train.checkpoint_every=2",
]


def _with_teachers(cfg: Config, run_dir: Path) -> Config:
    """The config pointing at verified teachers, trained into ``run_dir`` when missing."""
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    cfg, _ = teacher_config(cfg, data, run_dir)
    ensure_teachers(cfg, accelerator, data, run_dir)
    return cfg


@pytest.fixture(scope="module")
def tiny(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Config:
    out = tmp_path_factory.mktemp("bench")
    return _with_teachers(tiny_config(tiny_cache, out, "cpu=true"), out)


def _finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _check(result: dict[str, Any], teachers: bool | None, real: bool) -> None:
    """``teachers``: True if they run, False if none does, None for the cache (read, not run)."""
    s = result["seconds"]
    parts = ["data", "step", "total"] + (["teachers"] if teachers else [])
    assert all(_finite_positive(s[k]) for k in parts), s
    assert teachers is not False or s["teachers"] == 0.0  # none ran: not even a clock read
    assert s["total"] == pytest.approx(s["data"] + s["teachers"] + s["step"] + s["other"])
    assert _finite_positive(result["steps_per_second"])
    assert result["images_per_second"] == pytest.approx(
        result["images_per_step"] * result["steps_per_second"]
    )
    assert _finite_positive(result["peak_mib"])
    if real:
        assert _finite_positive(result["validation_s"]) and result["val_images"] > 0
        assert _finite_positive(result["checkpoint_s"]) and result["checkpoint_mib"] > 0


def test_real_loop_is_the_trainers_train_step(
    tiny: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = unirep.training.trainer.train_step

    def spy(ctx: Any, step: int, timings: dict[str, float] | None = None) -> dict[str, float]:
        calls.append(step)
        assert timings is not None  # the benchmark reads the trainer's own split
        return original(ctx, step, timings)

    monkeypatch.setattr(unirep.training.trainer, "train_step", spy)
    result = measure(tiny, "student", "real", steps=2, warmup=1)
    assert calls == [0, 1, 2]
    _check(result, teachers=True, real=True)
    assert result["images_per_step"] == 3 * 8  # one batch of 8 per domain
    assert result["seconds"]["page_faults"] >= 0  # minor page faults per step (the allocator)


def test_minimal_loop_never_calls_the_trainer(
    tiny: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the minimal loop must not use the trainer")

    monkeypatch.setattr(unirep.training.trainer, "train_step", forbidden)
    monkeypatch.setattr(unirep.training.trainer, "setup", forbidden)
    _check(measure(tiny, "student", "minimal", steps=2, warmup=0), teachers=True, real=False)
    _check(measure(tiny, "baseline", "minimal", steps=1, warmup=0), teachers=False, real=False)


def _check_benchmark(results: dict[str, Any]) -> None:
    for mode, loops in results["results"].items():
        for loop, result in loops.items():
            teachers = {"student": True, "baseline": False}.get(mode)  # None: the cache
            _check(result, teachers=teachers, real=loop == "real")
            assert mode == "student+cache" or not result["cache"]
    assert list(results["results"]) == ["baseline", "student", "student+cache"]
    for mode in results["results"]:
        assert all(_finite_positive(v) for v in results["overhead"][mode].values())
        phase = results["phase"][mode]
        assert phase["total"] == pytest.approx(
            sum(phase[k] for k in ("step", "teachers", "data", "validation", "checkpoint"))
        )
    # the rows of benchmark.json: the keys; the cached student runs no teacher
    rows = {r["config"]: r for r in results["rows"]}
    assert list(rows) == ["baseline", "student", "student+cache"]
    for row in rows.values():
        assert {"config", "steps_per_s", "peak_memory_mib", "ratio_to_reference_loop",
                "ratio_to_task_only", "phase_split"} <= set(row)  # fmt: skip
        assert set(row["phase_split"]) == {"step", "teachers", "data", "validation", "checkpoint"}
        assert sum(row["phase_split"].values()) == pytest.approx(1.0)
        assert _finite_positive(row["ratio_to_reference_loop"])
    assert rows["baseline"]["ratio_to_task_only"] == 1.0
    # no teacher in the baseline; the cached student only reads their outputs (no time bound:
    # the machine may be loaded)
    assert rows["baseline"]["phase_split"]["teachers"] == 0.0
    assert all(e["bytes_per_sample"] > 0 for e in rows["student+cache"]["cache"].values())
    table = format_report(results)
    assert "| student | real |" in table and "| baseline | minimal |" in table
    assert "| student+cache |" in table and "teacher-output cache of" in table


def test_pcgrad_benchmark(tiny: Config) -> None:
    root = [f"teachers.root={tiny.teachers.root}"] if tiny.teachers.root else []  # None: default
    cfg = tiny_config(
        Path(tiny.data.cache_dir or ""), Path(tiny.output_dir), "cpu=true", "weighting=pcgrad",
        *root,
    )  # fmt: skip
    results = run_benchmark(cfg, steps=1, warmup=1, spawn=False)
    assert results["info"]["weighting"] == "pcgrad"
    _check_benchmark(results)


def test_dense_benchmark(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = tiny_dense_config(tiny_cache, tmp_path, "cpu=true", *FAST_DENSE_TEACHERS)
    cfg = _with_teachers(cfg, tmp_path)
    results = run_benchmark(cfg, steps=1, warmup=1, spawn=False)
    assert results["info"]["tasks"] == ["semantic", "depth", "normal"]
    _check_benchmark(results)


@pytest.mark.slow
def test_script_spawns_every_measurement_and_writes_json(tiny_cache: Path, tmp_path: Path) -> None:
    from tests.conftest import TINY

    out = tmp_path / "bench.json"
    args = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--steps", "1", "--warmup=0",
            "--json", str(out), "--untrained-teachers", *TINY, f"data.cache_dir={tiny_cache}",
            "cpu=true"]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| student | real |" in proc.stdout and "UNTRAINED" in proc.stdout
    results = json.loads(out.read_text())
    assert results["info"]["spawned"] and results["info"]["untrained_teachers"]
    _check_benchmark(results)


def test_weightings_alternate_against_sum(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--weightings``: the methods' real steps, alternated, against ``sum``; a method whose
    solver import fails is skipped with its note; the backward passes through the trunk match
    what a hook on the trunk's first parameter counts."""
    overrides = [*TINY_DENSE, f"data.cache_dir={tiny_cache}", f"output_dir={tmp_path}", "cpu=true"]
    cfg = load_config("mini-scenes", overrides)
    tasks = ["semantic", "depth", "normal"]
    variants = weighting_variants(cfg, tasks, ["pcgrad", "mgda_ub", "nash_mtl"])
    assert list(variants) == ["sum", "pcgrad", "mgda_ub", "nash_mtl"]
    assert all("distill.enabled=false" in o for o in variants.values())
    groups = weighting_variants(cfg, tasks, ["grouped_uncertainty", "imtl", "adatask"])
    assert list(groups) == ["sum", "grouped_uncertainty", "imtl-l", "imtl-g", "imtl-h", "adatask"]
    assert 'weighting.kwargs={"groups": [["semantic", "depth"]]}' in groups["grouped_uncertainty"]
    assert 'weighting.kwargs={"mode": "g"}' in groups["imtl-g"]
    assert any(o.startswith("train.optim.optimizer=") for o in groups["adatask"])

    configs = weighting_configs(cfg, tasks, ["pcgrad", "mgda_ub", "alternating", "nash_mtl"])

    def no_solvers() -> None:
        raise ImportError("No module named 'cvxpy'")

    monkeypatch.setattr(NashMTL, "_import", staticmethod(no_solvers))
    checked = weighting_configs(cfg, tasks, ["pcgrad", "mgda_ub", "nash_mtl"])
    assert isinstance(checked["nash_mtl"], str) and "unirep[solvers]" in checked["nash_mtl"]
    calls: list[tuple[str, int]] = []  # (weighting, gradients of the trunk's first parameter)
    original = unirep.training.trainer.train_step

    def counting(ctx: Any, step: int, timings: dict[str, float] | None = None) -> Any:
        first = ctx.unwrapped.shared_parameters()[0]
        count = [0]
        hook = first.register_hook(lambda grad: count.__setitem__(0, count[0] + 1))
        try:
            return original(ctx, step, timings)
        finally:
            hook.remove()
            weighting = ctx.unwrapped.weighting
            calls.append((getattr(weighting, "on", type(weighting).__name__), count[0]))

    monkeypatch.setattr(unirep.training.trainer, "train_step", counting)
    rows = weighting_costs(configs, steps=2, warmup=0)  # nash_mtl: refused when it is built
    assert list(rows) == ["sum", "pcgrad", "mgda_ub", "alternating", "nash_mtl"]
    assert "unirep[solvers]" in rows["nash_mtl"]["skipped"]
    timed = {name: r for name, r in rows.items() if "skipped" not in r}
    assert timed["sum"]["ratio_total"] == 1.0 and timed["sum"]["ratio_step"] == 1.0
    for r in timed.values():
        assert _finite_positive(r["seconds"]["total_median"]) and _finite_positive(r["ratio_total"])
        assert r["step_peak_mib"] is None  # CPU: one process holds every method
    assert [r["passes"]["backward"] for r in timed.values()] == [1, 4, 1, 3]  # T = 3
    assert timed["mgda_ub"]["passes"]["partial"] == 3
    assert timed["alternating"]["passes"]["forward"] == 2  # three groups of one task
    # round robin, rotated by one each step; autograd reached the trunk's input that many times
    sum_, pcgrad, mgda_ub = ("SumWeighting", 1), ("parameters", 4), ("representation", 1)
    alternating = ("AlternatingWeighting", 3)
    # pcgrad's second step: path auto checks the Gramian path (the engine's vectorised backward
    # beside the Jacobian path's passes)
    probe = ("parameters", 5)
    assert calls == [sum_, pcgrad, mgda_ub, alternating, probe, mgda_ub, alternating, sum_]
    table = format_weighting_costs(rows)
    assert "| sum |" in table and "| pcgrad |" in table
    assert "| 1 (+3 to the trunk's output) |" in table and "| 3 (+2 forward) |" in table
    assert "skipped nash_mtl:" in table
