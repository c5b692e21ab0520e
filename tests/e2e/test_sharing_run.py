"""SMTL students end to end: a Lite run exports only the encoders its tasks picked, evaluates
to the same numbers from its export, resumes bit-exactly and trains on two processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_DENSE, fit_interrupted, tiny_dense_config
from tests.e2e.test_dense_run import _run
from tests.e2e.test_distributed import _launch
from unirep.io import load_weights
from unirep.models.build import count_parameters
from unirep.pipeline.export import load_student
from unirep.pipeline.rundir import make_accelerator, prepare_run_dir
from unirep.pipeline.stage_two import evaluate_student, resolve_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LITE = "dense.sharing.kwargs={gate: lite}"


@pytest.fixture(scope="module")
def lite_run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("smtl-runs")
    cfg = tiny_dense_config(tiny_cache, out, "name=lite", LITE, preset="mini-scenes-smtl")
    return _run(cfg)


def test_a_lite_run_exports_only_the_picked_encoders(lite_run: tuple[Path, dict]) -> None:
    run_dir, metrics = lite_run
    s = metrics["summary"]
    chosen = s["sharing"]["chosen"]
    assert set(chosen) == {"semantic", "depth", "normal"}
    assert s["sharing"]["gate"] == "lite"
    assert all(sorted(w) == [0.0, 1.0] for w in s["sharing"]["weights"].values())
    net, manifest = load_student(run_dir / "student")
    assert manifest["architecture"]["sharing_kwargs"]["selected"] == chosen
    assert set(net.private) == {t for t, c in chosen.items() if c == "private"}
    one = count_parameters(net.private[next(iter(net.private))]) if net.private else 0
    kept = len(net.private) + (net.encoder is not None)
    assert s["params"]["student"] == count_parameters(net)
    assert s["params"]["student_trained"] - s["params"]["student"] >= (4 - kept) * one
    weights = load_weights(run_dir / "student" / "model.safetensors")
    assert not any(k.startswith("gate") for k in weights)
    cost = s["inference"]["student"]
    assert cost["params"] == s["params"]["student"]
    assert cost["macs_per_image"] > 0 and cost["milliseconds_per_image"] > 0
    assert cost["weight_bytes"] <= (run_dir / "student" / "model.safetensors").stat().st_size
    assert "exported as the Lite network" in (run_dir / "student" / "README.md").read_text()
    log = (run_dir / "logs" / "student.csv").read_text()
    assert all(f"train/gate/{task}," in log for task in chosen)  # σ(a) over training
    report = (run_dir / "report.md").read_text()
    assert "## What the tasks share" in report and "## Inference cost" in report
    for task, pick in chosen.items():
        assert f"| {task} |" in report and pick in report


def test_the_lite_export_evaluates_to_the_runs_numbers(
    lite_run: tuple[Path, dict], tiny_cache: Path, tmp_path: Path
) -> None:
    run_dir, metrics = lite_run
    cfg = tiny_dense_config(tiny_cache, tmp_path, "name=eval", LITE, preset="mini-scenes-smtl")
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    again = evaluate_student(
        cfg, accelerator, data, prepare_run_dir(cfg, accelerator), run_dir / "student"
    )
    for task, entry in metrics["tasks"].items():
        assert again["tasks"][task]["student"] == pytest.approx(entry["student"], abs=1e-6)


@pytest.mark.parametrize("gate", ["lite", "softmax"])
def test_an_interrupted_smtl_phase_resumes_bit_exactly(
    gate: str, tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after step 3 and resumed, the phase equals the uninterrupted one bit for bit: the
    weights, the gates and the Lite gate's draw counter (so the same Gumbel draws follow)."""
    torch.set_num_threads(1)
    extra = [f"dense.sharing.kwargs={{gate: {gate}}}", "train.max_steps=6",
             "train.checkpoint_every=2", "train.eval_every=3"]  # fmt: skip

    def train(folder: str, crash_at: int | None) -> dict[str, torch.Tensor]:
        cfg = tiny_dense_config(tiny_cache, tmp_path / folder, *extra, preset="mini-scenes-smtl")
        phase, _ = fit_interrupted(cfg, tmp_path / folder / "run", "baseline", crash_at,
                                   monkeypatch)  # fmt: skip
        return {k: v.clone() for k, v in phase.module.state_dict().items()}

    whole, cut = train("a", None), train("b", 3)
    assert whole.keys() == cut.keys()
    different = [k for k in whole if not torch.equal(whole[k], cut[k])]
    assert not different, different
    if gate == "lite":
        draws = [v for k, v in whole.items() if k.endswith("gates.draws")]
        assert draws and int(draws[0]) > 0  # the kept (best) step's count of Gumbel draws


@pytest.mark.distributed
def test_two_processes_train_an_smtl_lite_student(tiny_cache: Path, tmp_path: Path) -> None:
    args = [*TINY_DENSE, f"data.cache_dir={tiny_cache}", f"output_dir={tmp_path}", "name=ddp",
            "--config", "mini-scenes-smtl", LITE, "baseline=false"]  # fmt: skip
    result = _launch(29561, args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["summary"]["num_processes"] == 2
    net, manifest = load_student(tmp_path / "ddp" / "student")
    assert (
        manifest["architecture"]["sharing_kwargs"]["selected"]
        == (metrics["summary"]["sharing"]["chosen"])
    )
    assert metrics["summary"]["params"]["student"] == count_parameters(net)


def test_the_benchmark_times_each_architecture_against_the_shared_encoder(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """``scripts/benchmark.py --sharing`` goes through ``term_costs``: the distilled variants of
    ``--variants sharing``, the shared-encoder student first (ratio 1)."""
    from unirep.experiments.benchmark import format_term_costs, term_costs
    from unirep.experiments.compare import SHARING_VARIANTS

    names = ["shared", "smtl", "smtl-lite"]
    configs = {
        n: tiny_dense_config(tiny_cache, tmp_path, *SHARING_VARIANTS[n], preset="mini-scenes-smtl")
        for n in names
    }
    assert configs["shared"].dense.sharing is None
    rows = term_costs(configs, steps=1, warmup=0, untrained_teachers=True, spawn=False)
    assert list(rows) == names and rows["shared"]["ratio_step"] == pytest.approx(1.0)
    assert all(r["ratio_step"] > 0 for r in rows.values())
    assert all(f"| {n} |" in format_term_costs(rows) for n in names)


def test_a_multi_domain_smtl_lite_run_exports_and_evaluates(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """SMTL on the mini-decathlon: each domain's gate between the public backbone (initialised,
    like every private one, from the objects teacher) and its own; the Lite export keeps the
    picked backbones and evaluates to the run's numbers."""
    from tests.conftest import tiny_config

    lite = "classification.sharing={name: smtl, kwargs: {gate: lite}}"
    cfg = tiny_config(tiny_cache, tmp_path, "name=cls", lite)
    run_dir, metrics = _run(cfg)
    s = metrics["summary"]
    assert set(s["sharing"]["chosen"]) == {"digits", "objects", "textures"}
    net, manifest = load_student(run_dir / "student")
    assert manifest["architecture"]["sharing_kwargs"]["selected"] == s["sharing"]["chosen"]
    assert s["params"]["student"] == count_parameters(net) < s["params"]["student_trained"]
    again_cfg = tiny_config(tiny_cache, tmp_path, "name=cls-eval", lite)
    accelerator = make_accelerator(again_cfg)
    data = resolve_data(again_cfg, accelerator)
    again = evaluate_student(
        again_cfg, accelerator, data, prepare_run_dir(again_cfg, accelerator), run_dir / "student"
    )
    for domain, entry in metrics["tasks"].items():
        assert again["tasks"][domain]["student"] == pytest.approx(entry["student"], abs=1e-9)
