"""DiSparse students end to end: a static run prunes per task by the unanimous rule, reports
the real density and the tasks' keep-mask IoU, exports a file that shrinks with the sparsity
and evaluates to the same numbers from it; the pretrained mode trains dense, then fine-tunes the
pruned network; the dynamic mode resumes bit-exactly and trains on two processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_DENSE, fit_interrupted, tiny_dense_config
from tests.e2e.test_dense_run import _run
from tests.e2e.test_distributed import _launch
from unirep.pipeline.export import load_student
from unirep.pipeline.rundir import make_accelerator, prepare_run_dir
from unirep.pipeline.stage_two import evaluate_student, resolve_data

pytestmark = pytest.mark.slow

PRESET = "mini-scenes-disparse"


@pytest.fixture(scope="module")
def static_run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("disparse-runs")
    cfg = tiny_dense_config(tiny_cache, out, "name=static", "dense.sharing.kwargs={sparsity: 0.9}",
                            preset=PRESET)  # fmt: skip
    return _run(cfg)


def test_a_static_run_reports_the_real_density_and_the_tasks_keep_mask_iou(
    static_run: tuple[Path, dict],
) -> None:
    run_dir, metrics = static_run
    s = metrics["summary"]
    sharing = s["sharing"]
    assert sharing["name"] == "disparse" and sharing["mode"] == "static"
    assert sharing["target_density"] == pytest.approx(0.1)
    # the union over tasks keeps more of the shared encoder than any one task asked for
    assert sharing["density"] > 0.1 and sharing["kept_weights"] < sharing["prunable_weights"]
    assert set(sharing["task_density"]) == {"semantic", "depth", "normal"}
    iou = sharing["iou"]
    assert len(iou["layers"]) == len(iou["iou"]) > 3 and all(0 <= v <= 1 for v in iou["pairwise"])
    stored = json.loads((run_dir / "pruning" / "student.json").read_text())
    assert stored["density"] == sharing["density"]
    cost = s["inference"]["student"]
    assert cost["nonzero_params"] < 0.5 * cost["params"]
    assert cost["nonzero_macs_per_image"] < cost["macs_per_image"]
    report = (run_dir / "report.md").read_text()
    assert "## What the tasks share" in report and "DiSparse (static masks)" in report
    assert "watershed layer" in report and (run_dir / "pruning.png").stat().st_size > 0


def test_the_sparse_export_is_smaller_and_predicts_the_same(
    static_run: tuple[Path, dict], tiny_cache: Path, tmp_path: Path
) -> None:
    run_dir, metrics = static_run
    student = run_dir / "student"
    net, manifest = load_student(student)
    assert manifest["format"] == "unirep-student/3" and manifest["packed"]
    assert "sharing" not in manifest["architecture"]  # a plain network with zero weights
    assert "stored packed" in (student / "README.md").read_text()
    dense_bytes = metrics["summary"]["inference"]["student"]["weight_bytes"]
    assert (student / "model.safetensors").stat().st_size < 0.5 * dense_bytes
    zeros = sum(int((p == 0).sum()) for p in net.parameters())
    assert zeros > 0.5 * sum(p.numel() for p in net.parameters())
    cfg = tiny_dense_config(tiny_cache, tmp_path, "name=eval", preset=PRESET)
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    again = evaluate_student(cfg, accelerator, data, prepare_run_dir(cfg, accelerator), student)
    for task, entry in metrics["tasks"].items():
        assert again["tasks"][task]["student"] == pytest.approx(entry["student"], abs=1e-6)


def test_the_pretrained_mode_trains_dense_then_fine_tunes_the_pruned_network(
    tiny_cache: Path, tmp_path: Path
) -> None:
    cfg = tiny_dense_config(tiny_cache, tmp_path, "name=pre", "baseline=false",
                            "dense.sharing.kwargs={mode: pretrained, sparsity: 0.8}",
                            preset=PRESET)  # fmt: skip
    run_dir, metrics = _run(cfg)
    assert (run_dir / "checkpoints" / "student-dense").is_dir()
    assert (run_dir / "logs" / "student-dense.csv").is_file()
    sharing = metrics["summary"]["sharing"]
    assert sharing["mode"] == "pretrained" and 0.2 <= sharing["density"] < 1.0
    dense = load_student(run_dir / "student")[0]
    assert any(bool((p == 0).any()) for p in dense.parameters())


def test_an_interrupted_dynamic_phase_resumes_bit_exactly(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after step 3 and resumed, a phase whose masks are pruned and regrown after every
    step equals the uninterrupted one bit for bit (weights, masks and optimizer state)."""
    torch.set_num_threads(1)
    extra = ["dense.sharing.kwargs={mode: dynamic, sparsity: 0.7, interval: 1, end: 1.0}",
             "train.max_steps=6", "train.checkpoint_every=2", "train.eval_every=3"]  # fmt: skip

    def train(folder: str, crash_at: int | None) -> dict[str, torch.Tensor]:
        cfg = tiny_dense_config(tiny_cache, tmp_path / folder, *extra, preset=PRESET)
        phase, _ = fit_interrupted(cfg, tmp_path / folder / "run", "baseline", crash_at,
                                   monkeypatch)  # fmt: skip
        return {k: v.clone() for k, v in phase.module.state_dict().items()}

    whole, cut = train("a", None), train("b", 3)
    assert whole.keys() == cut.keys()
    different = [k for k in whole if not torch.equal(whole[k], cut[k])]
    assert not different, different
    masks = [v for k, v in whole.items() if ".masks." in k and v.dtype == torch.bool]
    kept = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert 0.3 <= kept < 0.6  # pruned and regrown around the target density of 0.3


@pytest.mark.distributed
def test_two_processes_train_a_dynamic_disparse_student(tiny_cache: Path, tmp_path: Path) -> None:
    args = [*TINY_DENSE, f"data.cache_dir={tiny_cache}", f"output_dir={tmp_path}", "name=ddp",
            "--config", PRESET, "baseline=false", "train.max_steps=6", "train.eval_every=3",
            "dense.sharing.kwargs={mode: dynamic, sparsity: 0.8, interval: 2, end: 1}"]  # fmt: skip
    result = _launch(29581, args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["summary"]["num_processes"] == 2
    sharing = metrics["summary"]["sharing"]
    assert sharing["mode"] == "dynamic" and 0.2 <= sharing["density"] < 0.5
    net, manifest = load_student(tmp_path / "ddp" / "student")
    assert manifest["packed"] and any(bool((p == 0).any()) for p in net.parameters())
