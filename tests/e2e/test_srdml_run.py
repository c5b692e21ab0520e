"""SRDML end to end: a tiny mini-scenes-srdml run records the learned task relation in
metrics.json, the student's log and the report; the student phase resumes bit-exactly (the
relation included) and trains on two processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_DENSE, fit_interrupted, tiny_dense_config
from tests.e2e.test_dense_run import _run
from tests.e2e.test_distributed import _launch

pytestmark = pytest.mark.slow

PAIRS = {"semantic-depth", "semantic-normal", "depth-normal"}


@pytest.fixture(scope="module")
def srdml_run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("srdml-runs")
    return _run(tiny_dense_config(tiny_cache, out, "name=srdml", preset="mini-scenes-srdml"))


def test_the_relation_is_in_the_metrics_the_log_and_the_report(
    srdml_run: tuple[Path, dict],
) -> None:
    run_dir, metrics = srdml_run
    record = metrics["summary"]["saliency"]
    relation = record["relation"]
    assert set(relation) == PAIRS and record["source"] == "objective"
    assert sum(relation.values()) == pytest.approx(1.0, abs=1e-5)
    assert min(relation.values()) >= record["floor"] - 1e-6
    assert any(abs(v - 1 / 3) > 1e-6 for v in relation.values())  # it learned (4 steps)
    assert record["closest"] == max(relation, key=relation.__getitem__)
    student_log = (run_dir / "logs" / "student.csv").read_text()
    assert all(f"train/srdml/relation/{pair}," in student_log for pair in PAIRS)
    assert "train/srdml/distance/semantic-depth," in student_log
    assert "srdml" not in (run_dir / "logs" / "baseline.csv").read_text()  # the baseline: plain
    report = (run_dir / "report.md").read_text()
    assert "## How the tasks relate (SRDML)" in report and "](saliency.png)" in report
    assert all(f"| {pair} | {relation[pair]:.3f} |" in report for pair in PAIRS)
    assert (run_dir / "saliency.png").stat().st_size > 0


def test_an_interrupted_srdml_student_resumes_bit_exactly(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed before step 3 and resumed, the student phase equals the uninterrupted one bit for
    bit: the weights and the relation c (a buffer of the objective, in the checkpoint)."""
    torch.set_num_threads(1)
    extra = ["train.max_steps=5", "train.checkpoint_every=2", "train.eval_every=5",
             "distill.enabled=false", "dense.saliency.relation_lr=1.0"]  # fmt: skip

    def train(folder: str, crash_at: int | None) -> dict[str, torch.Tensor]:
        cfg = tiny_dense_config(tiny_cache, tmp_path / folder, *extra, preset="mini-scenes-srdml")
        phase, _ = fit_interrupted(cfg, tmp_path / folder / "run", "student", crash_at,
                                   monkeypatch)  # fmt: skip
        return {k: v.clone() for k, v in phase.module.state_dict().items()}

    whole, cut = train("a", None), train("b", 3)
    assert whole.keys() == cut.keys()
    different = [k for k in whole if not torch.equal(whole[k], cut[k])]
    assert not different, different
    relation = whole["objective.joint.srdml.relation"]
    assert not torch.allclose(relation, torch.full_like(relation, 1 / 3))


@pytest.mark.distributed
def test_two_processes_train_an_srdml_student(tiny_cache: Path, tmp_path: Path) -> None:
    args = [*TINY_DENSE, f"data.cache_dir={tiny_cache}", f"output_dir={tmp_path}", "name=ddp",
            "--config", "mini-scenes-srdml", "baseline=false"]  # fmt: skip
    result = _launch(29585, args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["summary"]["num_processes"] == 2
    relation = metrics["summary"]["saliency"]["relation"]
    assert set(relation) == PAIRS and sum(relation.values()) == pytest.approx(1.0, abs=1e-5)
    assert "train/srdml/relation/depth-normal," in (tmp_path / "ddp/logs/student.csv").read_text()
