"""Progressive decoder fusion and AutoMTL students end to end: stage by stage (or search, then
retraining) in one command, resumable between stages, on one and two processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_DENSE, tiny_dense_config
from tests.e2e.test_dense_run import _run
from tests.e2e.test_distributed import _launch, without_timings
from unirep.config.schema import Config
from unirep.models.build import count_parameters
from unirep.pipeline.export import load_student

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------
# Progressive decoder fusion

PDF_DATA = "data.generator={seed: 0, height: 32, width: 48, scale: 0.1}"  # 6 validation images


def _pdf_config(cache: Path, out: Path, *extra: str) -> Config:
    return tiny_dense_config(cache, out, PDF_DATA, *extra, preset="mini-scenes-pdf")


@pytest.fixture(scope="module")
def pdf_run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pdf-runs")
    return _run(_pdf_config(tiny_cache, out, "name=pdf"))


def test_a_pdf_run_fuses_block_by_block_and_exports_the_last_stage(
    pdf_run: tuple[Path, dict],
) -> None:
    run_dir, metrics = pdf_run
    sharing = metrics["summary"]["sharing"]
    stages = sharing["stages"]
    # three tasks: the reference's rule always fuses some tasks, so both blocks get fused
    assert [s["block"] for s in stages] == [0, 1] and len(sharing["fusion"]) == 2
    for k, stage in enumerate(stages):
        stored = json.loads((run_dir / "fusion" / f"student-stage{k}.json").read_text())
        assert stored == stage and stage["images"] == 6
        assert sorted(t for g in stage["groups"] for t in g) == ["depth", "normal", "semantic"]
        assert stage["groups"] == sharing["fusion"][k]
    for role in ("baseline", "student"):
        folders = sorted(p.name for p in (run_dir / "checkpoints").glob(f"{role}-stage*"))
        assert folders == [f"{role}-stage{k}" for k in range(3)]
    net, manifest = load_student(run_dir / "student")
    assert manifest["architecture"]["sharing_kwargs"]["fusion"] == sharing["fusion"]
    assert metrics["summary"]["params"]["student"] == count_parameters(net)
    report = (run_dir / "report.md").read_text()
    assert "Progressive decoder fusion" in report and "stage 1, block 1" in report


def test_a_pdf_run_resumes_between_stages_to_the_same_numbers(
    pdf_run: tuple[Path, dict], tiny_cache: Path, tmp_path: Path
) -> None:
    """Its stages finished and their groupings stored, a run whose evaluation and export were
    lost trains nothing again and reaches the same metrics."""
    run_dir, metrics = pdf_run
    copy = tmp_path / "pdf"
    shutil.copytree(run_dir, copy)
    for name in ("metrics.json", "report.md"):
        (copy / name).unlink()
    shutil.rmtree(copy / "student")
    (copy / "fusion" / "student-stage1.json").unlink()  # measured again, the same
    again = _run(_pdf_config(tiny_cache, tmp_path, "name=pdf", "resume=true"))[1]

    assert without_timings(again) == without_timings(metrics)


@pytest.mark.distributed
def test_two_processes_fuse_progressively(tiny_cache: Path, tmp_path: Path) -> None:
    args = [*TINY_DENSE, PDF_DATA, f"data.cache_dir={tiny_cache}", f"output_dir={tmp_path}",
            "name=ddp", "--config", "mini-scenes-pdf", "baseline=false",
            "dense.sharing.kwargs={max_blocks: 1}"]  # fmt: skip
    result = _launch(29563, args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["summary"]["num_processes"] == 2
    (stage,) = metrics["summary"]["sharing"]["stages"]
    assert stage["images"] == 6  # every validation image, gathered from both processes once


# --------------------------------------------------------------------------------------------
# AutoMTL


@pytest.fixture(scope="module")
def automtl_run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("automtl-runs")
    return _run(tiny_dense_config(tiny_cache, out, "name=auto", preset="mini-scenes-automtl"))


def test_an_automtl_run_searches_then_retrains_what_it_chose(
    automtl_run: tuple[Path, dict],
) -> None:
    run_dir, metrics = automtl_run
    for role in ("baseline", "student"):
        assert (run_dir / "checkpoints" / f"{role}-search" / "done.json").is_file()
        assert (run_dir / "checkpoints" / role / "done.json").is_file()
    search = json.loads((run_dir / "branching" / "student.json").read_text())
    sharing = metrics["summary"]["sharing"]
    assert sharing["name"] == "automtl" and sharing["choices"] == search["choices"]
    assert sharing["stages"] == [search] and len(search["layers"]) == 13
    log = (run_dir / "logs" / "student-search.csv").read_text()
    assert "train/sharing_cost," in log and "train/policy/depth/specific," in log
    assert "sharing_cost" not in (run_dir / "logs" / "student.csv").read_text()  # fixed: none
    net, manifest = load_student(run_dir / "student")
    assert manifest["architecture"]["sharing_kwargs"]["choices"] == search["choices"]
    assert metrics["summary"]["params"]["student"] == count_parameters(net)
    assert count_parameters(net) < search["supernet_params"]
    assert manifest["timm_backbone"]["folder"] is None  # per-task branches: no one backbone
    assert (run_dir / "branching.png").stat().st_size > 0
    assert (
        "![Which task shares which convolution](branching.png)"
        in (run_dir / "report.md").read_text()
    )


@pytest.mark.distributed
def test_two_processes_search_and_retrain(tiny_cache: Path, tmp_path: Path) -> None:
    args = [*TINY_DENSE, f"data.cache_dir={tiny_cache}", f"output_dir={tmp_path}", "name=ddp",
            "--config", "mini-scenes-automtl", "baseline=false"]  # fmt: skip
    result = _launch(29565, args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["summary"]["num_processes"] == 2
    _, manifest = load_student(tmp_path / "ddp" / "student")
    assert (
        manifest["architecture"]["sharing_kwargs"]["choices"]
        == (metrics["summary"]["sharing"]["choices"])
    )
