"""The `decathlon` preset end to end on a tiny tree in the official format (all 10 domains)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from unirep.stage_one.keys import teacher_path
from unirep.stage_one.train import ensure_teachers

from tests.decathlon_fixture import SIZES, write_official_fixture
from unirep.data.classification.decathlon import DECATHLON_DOMAINS
from unirep.pipeline.export import load_student
from unirep.pipeline.rundir import make_accelerator, prepare_run_dir
from unirep.pipeline.stage_two import distill, resolve_data
from unirep.pipeline.validate import load_config

pytestmark = pytest.mark.slow

TINY = [
    "classification.backbone=resnet_decathlon_tiny",
    "data.batch_size=4",
    "classification.batch_sizes={}",
    "data.eval_batch_size=16",
    "data.num_workers=0",
    "progress=false",
    *[
        f"{phase}.{key}={value}"
        for phase in ("teachers.train", "classification.finetune_train", "train")
        for key, value in (("max_steps", 2), ("eval_every", 2), ("checkpoint_every", 2))
    ],
]


@pytest.mark.parametrize(
    ("preset", "labelled_test"),
    [("decathlon", False), ("decathlon", True), ("decathlon-ra", True)],
)
def test_decathlon_preset_end_to_end(tmp_path: Path, preset: str, labelled_test: bool) -> None:
    root = write_official_fixture(tmp_path / "decathlon-1.0", labelled_test=labelled_test)
    cfg = load_config(
        preset,
        [*TINY, f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
         f"output_dir={tmp_path / 'runs'}", "name=vd"],
    )  # fmt: skip
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    assert list(data.tasks()) == data.streams() == list(DECATHLON_DOMAINS)
    assert data.preprocessing("imagenet12")["crop"] == 72
    assert data.preprocessing("dtd")["crop"] == 64
    assert data.datasets("train", train=True)["imagenet12"][0]["image"].shape == (3, 72, 72)
    assert data.datasets("val")["aircraft"][0]["image"].shape == (3, 64, 64)
    run_dir = prepare_run_dir(cfg, accelerator)
    seconds = ensure_teachers(cfg, accelerator, data, run_dir)
    teacher = json.loads((teacher_path(cfg, data, "dtd") / "teacher.json").read_text())
    assert teacher["training"]["finetuned_from"].endswith("imagenet12")
    metrics = distill(cfg, accelerator, data, run_dir, seconds)

    assert set(metrics["tasks"]) == set(DECATHLON_DOMAINS)
    accuracy = metrics["tasks"]["dtd"]["student"]["accuracy"]
    assert (accuracy is None) != labelled_test  # a stripped test split has no labels
    assert (metrics["summary"]["decathlon_score"] is None) != labelled_test
    entries = json.loads((run_dir / "results.json").read_text())
    assert len(entries) == len(DECATHLON_DOMAINS) * SIZES["test"]
    for entry in entries:  # official global ids: the domain index d is encoded in both
        d = entry["image_id"] // 10**7
        assert entry["category_id"] // 10**7 == d and 1 <= entry["category_id"] % 10**7 <= 2
    report = (run_dir / "report.md").read_text()
    official = metrics["summary"].get("official_decathlon_score")
    if labelled_test:
        assert set(official) == {"student", "teacher", "baseline"}
        assert "published: URL (RA)" in report and "published: Parallel RA" in report
    else:
        assert official is None and "published:" not in report
    multiplier = metrics["summary"]["backbone_multiplier"]
    if preset == "decathlon-ra":  # 10 domains of 1x1 adapters and BN copies beside the 3x3s
        assert 1.9 < multiplier < 2.5
        student, _ = load_student(run_dir / "student")
        assert student.domain_specific
    else:
        assert multiplier == 1.0
