"""scripts/compare.py's table: variants parsed, best-of chosen on validation, mean ± std, Δm."""

from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.conftest import TINY_DENSE
from unirep.errors import ConfigError
from unirep.experiments.compare import (
    PARTIAL_VARIANTS,
    Runners,
    Variant,
    dominated_by_front,
    expand_front,
    front_figure,
    parse_variants,
    resolve,
    run_comparison,
    summarise,
    write_comparison,
)
from unirep.experiments.jobs import Job, run_jobs
from unirep.pipeline.api import run_recipe, train_teacher_job
from unirep.pipeline.validate import load_config

RUNNERS = Runners(run=run_recipe, teacher=train_teacher_job)


def _metrics(miou: float, abs_err: float, val: float, dm: float) -> dict:
    return {
        "tasks": {
            "semantic": {"student": {"miou": miou, "pixel_acc": 0.5}},
            "depth": {"student": {"abs_err": abs_err, "rel_err": 0.2}},
        },
        "summary": {
            "delta_m_vs_teachers": dm,
            "selection": {"student": {"split": "val", "best_step": 4, "val_delta_m": val}},
        },
    }


def test_variants_parse_and_best_of_is_chosen_on_validation_never_test() -> None:
    variants = parse_variants(["supervised", "mtpsl", "jtr", "distill+best-of:mtpsl,jtr",
                               "mine=dense.partial.weight=3;seed=2"])  # fmt: skip
    assert variants[0].overrides == PARTIAL_VARIANTS["supervised"]
    assert variants[-1] == Variant("mine", ["dense.partial.weight=3", "seed=2"])
    by_name = {v.name: v for v in variants}
    # jtr is better on validation, mtpsl on test: validation decides
    results = {
        "mtpsl": [_metrics(0.9, 0.1, val=1.0, dm=9.0)],
        "jtr": [_metrics(0.1, 0.9, val=2.0, dm=-9.0)],
    }
    overrides, note = resolve(by_name["distill+best-of:mtpsl,jtr"], by_name, results)
    assert "dense.partial.method=jtr" in overrides and "distill.enabled=true" in overrides
    assert "distill.enabled=false" not in overrides and "→ jtr" in note
    with pytest.raises(ConfigError, match="run mtpsl"):
        resolve(by_name["distill+best-of:mtpsl,jtr"], by_name, {})
    with pytest.raises(ConfigError, match="unique"):
        parse_variants(["jtr", "jtr"])
    with pytest.raises(ConfigError, match="variant 'nonsense'"):
        parse_variants(["nonsense"])


def test_summary_is_mean_and_std_over_seeds_with_delta_m_against_the_reference(
    tmp_path: Path,
) -> None:
    results = {
        "supervised": [_metrics(0.40, 0.50, 0, -2.0), _metrics(0.20, 0.50, 0, -4.0)],
        "mtpsl": [_metrics(0.44, 0.45, 0, 1.0), _metrics(0.22, 0.40, 0, 3.0)],
    }
    table = summarise(results, "supervised")
    assert table["mtpsl"]["semantic/miou"] == pytest.approx([0.33, 0.11 * 2**0.5])
    assert table["mtpsl"]["delta_m_vs_teachers"] == pytest.approx([2.0, 2**0.5])
    # seed 0: (+10 % miou, +10 % abs err), seed 1: (+10 %, +20 %): Δm 10 and 15
    assert table["mtpsl"]["delta_m_vs_supervised"] == pytest.approx([12.5, 5 / 2**0.5])
    assert table["supervised"]["delta_m_vs_supervised"] == [0.0, 0.0]
    content = write_comparison(tmp_path, "p", [0, 1], results, "supervised", ["a note"])
    assert json.loads((tmp_path / "comparison.json").read_text()) == json.loads(json.dumps(content))
    text = (tmp_path / "comparison.md").read_text()
    assert "| mtpsl |" in text and "+12.50 ± 3.54" in text and "- a note" in text
    assert (tmp_path / "comparison.png").stat().st_size > 0


def _without_seconds(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if "seconds" not in str(k)}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


@pytest.mark.slow
def test_side_by_side_jobs_compute_what_one_process_computes_and_share_teachers(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """``--jobs 2`` (worker processes) gives the metrics of ``--jobs 1`` (in this process), trains
    each teacher once for all the variants of a seed, resolves best-of on validation, and a
    second invocation reads every finished run back."""
    torch.set_num_threads(1)  # the thread count every job runs at, in a worker or here
    variants = parse_variants(["supervised", "mtpsl", "best-of:supervised,mtpsl"])
    found = {}
    for workers in (1, 2):
        settings = [*TINY_DENSE, f"data.cache_dir={tiny_cache}",
                    f"output_dir={tmp_path / f'out{workers}'}",
                    f"teachers.root={tmp_path / f'teachers{workers}'}"]  # fmt: skip
        log: list[str] = []
        folder, results, notes, cost = run_comparison(
            "mini-scenes-onelabel", variants, [0], "cmp", settings, RUNNERS, workers, log.append
        )
        teacher_jobs = [j for j in cost["job_seconds"] if j.startswith("teacher ")]
        assert len(teacher_jobs) == 3  # 3 tasks, not × 3 variants
        assert len(list((tmp_path / f"teachers{workers}").glob("*/teacher.json"))) == 3
        # 3 teachers + 2 runs: best-of's chosen config has run already, so it is reused
        assert cost["workers"] == workers and len(cost["job_seconds"]) == 3 + 2
        assert notes and "→" in notes[0]
        chosen = notes[0].split("→ ")[1].split(" ")[0]
        assert _without_seconds(results["best-of:supervised,mtpsl"]) == _without_seconds(
            results[chosen]
        )
        found[workers] = (_without_seconds(results), notes)
        assert folder == tmp_path / f"out{workers}" / "cmp"
    assert found[1] == found[2]
    # a second invocation trains nothing and reads every run back
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "out2").rglob("metrics.json"))
    _, again, _, cost = run_comparison(
        "mini-scenes-onelabel", variants, [0], "cmp", settings, RUNNERS, 2, lambda _: None
    )
    assert not [j for j in cost["job_seconds"] if j.startswith("teacher ")]
    assert _without_seconds(again) == found[2][0]
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "out2").rglob("metrics.json")) == before
    # a run saved before a config key existed is the same run when the key holds its default
    saved = tmp_path / "out2" / "cmp" / "supervised-seed0" / "config.yaml"
    older = yaml.safe_load(saved.read_text())
    del older["dense"]["transfer"]["class_distance"], older["train"]["grad_clip"]
    saved.write_text(yaml.safe_dump(older))
    _, again, _, _ = run_comparison(
        "mini-scenes-onelabel", variants, [0], "cmp", settings, RUNNERS, 1, lambda _: None
    )
    assert _without_seconds(again) == found[2][0]
    # a finished run is never read back for another config: refused in one line, naming it
    changed = [*settings, "distill.contrastive_temperature=0.2"]
    with pytest.raises(ConfigError, match=r"supervised-seed0.*finished with a different config.*"
                       r"contrastive_temperature"):  # fmt: skip
        run_comparison("mini-scenes-onelabel", variants, [0], "cmp", changed, RUNNERS, 1, print)


def test_best_of_variants_name_two_other_variants() -> None:
    with pytest.raises(ConfigError, match="two or more other variants"):
        parse_variants(["supervised", "best-of:supervised,nope"])
    with pytest.raises(ConfigError, match="two or more other variants"):
        parse_variants(["supervised", "mtpsl", "bad+best-of:supervised,mtpsl"])
    variants = parse_variants(["supervised", "mtpsl", "best-of:supervised,mtpsl"])
    by_name = {v.name: v for v in variants}
    results = {"supervised": [_metrics(0.1, 0.1, val=3.0, dm=0)],
               "mtpsl": [_metrics(0.1, 0.1, val=1.0, dm=0)]}  # fmt: skip
    overrides, note = resolve(by_name["best-of:supervised,mtpsl"], by_name, results)
    assert overrides == PARTIAL_VARIANTS["supervised"] and "→ supervised" in note


def test_combine_takes_every_term_that_beats_the_reference_on_validation() -> None:
    variants = parse_variants(["xtask"])
    assert [v.name for v in variants][:2] == ["distill", "+consistency"]
    combine = variants[-1]
    by_name = {v.name: v for v in variants}
    vals = {"distill": 1.0, "+consistency": 2.0, "+alignment": 0.5, "+cycle": 1.5,
            "+contrastive": 0.9, "+contrastive-distill": 3.0}  # fmt: skip
    # test scores say the opposite of validation: they must not matter
    results = {n: [_metrics(0.1, 0.1, val=v, dm=-v)] for n, v in vals.items()}
    overrides, note = resolve(combine, by_name, results, reference="distill")
    assert (
        "dense.transfer.consistency.weight=0.1" in overrides
        and "dense.transfer.cycle.weight=0.1" in overrides
    )
    assert "distill.contrastive_weight=0.1" in overrides
    assert not [o for o in overrides if "alignment" in o or "dense.transfer.contrastive" in o]
    assert overrides.count("dense.partial.method=none") == 1
    assert "→ +consistency + +cycle + +contrastive-distill" in note
    # none beats the reference: the best one alone
    worse = {n: [_metrics(0.1, 0.1, val=-v, dm=0)] for n, v in vals.items()}
    worse["distill"] = [_metrics(0.1, 0.1, val=5.0, dm=0)]
    overrides, note = resolve(combine, by_name, worse, reference="distill")
    assert "→ +alignment (" in note
    with pytest.raises(ConfigError, match="run distill"):
        resolve(combine, by_name, {n: r for n, r in results.items() if n != "distill"}, "distill")


def test_jobs_start_by_priority_once_their_dependencies_finished() -> None:
    order: list[str] = []

    def note(name: str) -> str:
        order.append(name)
        return name

    jobs = [
        Job("late", note, ("late",), priority=3),
        Job("after-teacher", note, ("after-teacher",), after=["teacher"], priority=1),
        Job("teacher", note, ("teacher",)),
    ]
    added = {"teacher": [Job("derived", note, ("derived",), after=["late"], priority=0)]}
    done = run_jobs(jobs, 1, on_done=lambda n, _: added.get(n, []), log=lambda _: None)
    assert order == ["teacher", "after-teacher", "late", "derived"]
    assert set(done) == {"teacher", "after-teacher", "late", "derived"}
    assert done["late"].value == "late" and done["late"].seconds >= 0
    with pytest.raises(ConfigError, match="unknown jobs"):
        run_jobs([Job("a", note, ("a",), after=["nowhere"])], 1, log=lambda _: None)
    with pytest.raises(ConfigError, match="wait for each other"):
        run_jobs([Job("a", note, ("a",), after=["b"]), Job("b", note, ("b",), after=["a"])], 1,
                 log=lambda _: None)  # fmt: skip


def test_jobs_run_in_worker_processes_and_a_failure_is_raised() -> None:
    done = run_jobs([Job(f"j{i}", operator.mul, (i, 10)) for i in range(3)], 2, log=lambda _: None)
    assert {n: r.value for n, r in done.items()} == {"j0": 0, "j1": 10, "j2": 20}
    with pytest.raises(ZeroDivisionError):
        run_jobs([Job("bad", operator.truediv, (1, 0))], 2, log=lambda _: None)


def test_the_critical_path_runs_first_and_derived_runs_start_as_soon_as_they_can(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """Teachers, then the candidates of a derived variant, then the derived runs (none when the
    chosen config has run already), then the rest (which only fill idle workers); the runners
    are injected, so nothing trains here."""
    calls: list[str] = []

    def fake_run(preset: str | None, overrides: list[str]) -> dict:
        name = next(o for o in overrides if o.startswith("name=")).rsplit("/", 1)[1]
        calls.append(name)
        return _metrics(0.5, 0.5, val=2.0 if name.startswith("c-") else 1.0, dm=0.0)

    def fake_teacher(preset: str | None, overrides: list[str], task: str, folder: str) -> str:
        calls.append(f"teacher {task}")
        return folder

    settings = [*TINY_DENSE, f"data.cache_dir={tiny_cache}", f"output_dir={tmp_path}",
                f"teachers.root={tmp_path / 'teachers'}"]  # fmt: skip
    variants = parse_variants(["a=seed=0", "b=train.max_steps=3", "c=train.max_steps=5",
                               "best-of:b,c"])  # fmt: skip
    _, results, notes, _ = run_comparison(
        "mini-scenes", variants, [0, 1], "cmp", settings, Runners(fake_run, fake_teacher), 1,
        lambda _: None,
    )  # fmt: skip
    teachers = [c for c in calls if c.startswith("teacher ")]
    assert len(teachers) == 6 and calls[:6] == teachers  # 3 tasks × 2 seeds (seed in the key)
    # best-of:b,c is c's config: c's runs are reused, not run again
    assert calls[6:] == ["b-seed0", "b-seed1", "c-seed0", "c-seed1", "a-seed0", "a-seed1"]
    assert "→ c" in notes[0] and "runs are reused" in notes[0]
    assert list(results) == ["a", "b", "c", "best-of:b,c"]
    assert results["best-of:b,c"] == results["c"]


def test_the_balance_set_sweeps_static_weights_over_the_run_tasks() -> None:
    variants = parse_variants(["balance"])
    names = [v.name for v in variants]
    assert names[0] == "sum" and "front" in names and "distill" in names
    assert {"uncertainty", "dwa", "famo", "mgda_ub", "pcgrad", "cagrad", "nash_mtl",
            "adatask"} <= set(names)  # fmt: skip
    assert all("distill.enabled=false" in v.overrides for v in variants[:9])
    best = next(n for n in names if n.startswith("distill+best-of:"))
    assert "front" not in best and "adatask" in best
    expanded = expand_front(variants, ["semantic", "depth", "normal"])
    front = [v for v in expanded if v.name.startswith("static-")]
    assert [v.name for v in front] == ["static-1-1-1", "static-2-1-1", "static-4-1-1",
        "static-1-2-1", "static-1-4-1", "static-1-1-2", "static-1-1-4"]  # fmt: skip
    assert "front" not in [v.name for v in expanded]
    # weights normalised to the sum scale (Σ w = T)
    cfg = load_config("mini-scenes", front[2].overrides)
    assert cfg.weighting.name == "static" and not cfg.distill.enabled
    assert sum(cfg.weighting.kwargs["weights"].values()) == pytest.approx(3.0)
    assert cfg.weighting.kwargs["weights"]["semantic"] == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="two or more"):
        parse_variants(["sum", "front", "best-of:sum,front"])


def test_methods_are_drawn_and_judged_against_the_static_weight_front(tmp_path: Path) -> None:
    def run(miou: float, abs_err: float) -> dict:
        return _metrics(miou, abs_err, val=0.0, dm=0.0)

    results = {  # miou ↑, abs_err ↓
        "sum": [run(0.50, 0.50), run(0.52, 0.50)],
        "static-2-1": [run(0.60, 0.60), run(0.60, 0.60)],
        "static-1-2": [run(0.40, 0.40), run(0.40, 0.40)],
        "static-1-1": [run(0.55, 0.45), run(0.55, 0.45)],  # beats sum on both
        "pcgrad": [run(0.70, 0.30), run(0.70, 0.30)],  # beyond the front
    }
    notes = dominated_by_front(results)
    assert "sum: dominated by the static weightings static-1-1" in notes
    assert "pcgrad: not dominated by any static weighting of the sweep" in notes
    assert front_figure(results)[:8] == b"\x89PNG\r\n\x1a\n"
    write_comparison(tmp_path, "p", [0, 1], results, "sum", [])
    text = (tmp_path / "comparison.md").read_text()
    assert "](front.png)" in text and "pcgrad: not dominated" in text
    assert (tmp_path / "front.png").stat().st_size > 0
    assert front_figure({"sum": results["sum"]}) is None
