"""The cross-task terms and contrastive distillation inside real phases: built from the config,
trained with the student (gradients to the transfer networks and the student, never the
teachers), checkpointed and resumed bit-exactly, dropped at export, refused when misconfigured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from unirep.stage_one.train import ensure_teachers

from tests.conftest import fit_interrupted, tiny_dense_config
from unirep.batch import make_batch
from unirep.errors import ConfigError
from unirep.pipeline.export import read_student
from unirep.pipeline.rundir import prepare_run_dir
from unirep.pipeline.stage_two import distill, load_teachers, resolve_data, student_phase

XTASK = "mini-scenes-xtask"
ALL_TERMS = [
    "dense.transfer.consistency.weight=0.1",
    "dense.transfer.alignment.weight=0.1",
    "dense.transfer.cycle.weight=0.1",
    "dense.transfer.contrastive.weight=0.1",
]


def _series(path: Path) -> set[str]:
    return {line.split(",")[1].removeprefix("train/") for line in path.read_text().splitlines()[1:]}


@pytest.mark.slow
def test_xtask_run_end_to_end_with_contrastive_distillation(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """The preset's four terms and CRD-style distillation train, log, and are not exported."""
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    cfg = tiny_dense_config(tiny_cache, tmp_path, "name=x", "baseline=false",
                            "distill.contrastive_weight=0.1", preset=XTASK)  # fmt: skip
    data = resolve_data(cfg, accelerator)
    run_dir = prepare_run_dir(cfg, accelerator)
    metrics = distill(
        cfg, accelerator, data, run_dir, ensure_teachers(cfg, accelerator, data, run_dir)
    )
    assert metrics["summary"]["delta_m_vs_teachers"] is not None
    series = _series(run_dir / "logs" / "student.csv")
    for term in ("consistency", "alignment", "cycle", "contrastive"):
        assert f"xtask/{term}" in series
    assert {f"contrastive/{t}" for t in data.tasks()} <= series
    _, weights = read_student(run_dir / "student")
    assert not [k for k in weights if "transfer" in k or "objective" in k or "projector" in k]


def _phase(tiny_cache: Path, tmp_path: Path, *extra: str):
    cfg = tiny_dense_config(tiny_cache, tmp_path, "name=g", *extra, preset=XTASK)
    accelerator = Accelerator(cpu=True)
    data = resolve_data(cfg, accelerator)
    run_dir = prepare_run_dir(cfg, accelerator)
    ensure_teachers(cfg, accelerator, data, run_dir)
    tasks = data.tasks()
    teachers = load_teachers(cfg, data, tasks)
    reference = {n: {t.main_metric: 1.0} for n, t in tasks.items()}
    phase, _ = student_phase(
        cfg, accelerator, "student", data, tasks, run_dir, teachers, reference, True
    )
    loader = torch.utils.data.DataLoader(data.datasets("train", train=True)["images"], 4)
    batch = make_batch({"images": next(iter(loader))}, tasks)
    return phase, teachers, batch


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [[t] for t in ALL_TERMS]
    + [["distill.contrastive_weight=1.0", "dense.transfer.consistency.weight=0"]],
    ids=["consistency", "alignment", "cycle", "contrastive", "contrastive_distill"],
)
def test_each_term_reaches_its_networks_and_the_student_never_the_teachers(
    extra: list[str], tiny_cache: Path, tmp_path: Path
) -> None:
    zero = [t.replace("=0.1", "=0") for t in ALL_TERMS if t not in extra]
    phase, teachers, batch = _phase(tiny_cache, tmp_path, *zero, *extra)
    module = phase.module
    teacher_out = {t: teachers[t].net(batch.inputs)[t] for t in teachers}
    bundle = module(batch, teacher_out, step=5, total_steps=10)
    if extra[0].startswith("dense.transfer."):
        name = "xtask_" + extra[0].split(".")[2]
        assert set(bundle.joint) == {name}
        value = bundle.joint[name]
    else:
        value = sum(bundle.distill[t]["contrastive"] for t in bundle.distill)
        assert not bundle.joint
    assert torch.isfinite(value) and value.item() != 0.0
    value.backward()
    student = [p.grad for p in module.student.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in student)
    if extra[0].startswith("dense.transfer."):
        xt = module.objective.joint["xtask"].terms
        grads = [p.grad for p in xt.transfers.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    else:
        grads = [p.grad for p in module.aligners.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    for teacher in teachers.values():
        assert all(p.grad is None for p in teacher.net.parameters())


@pytest.mark.slow
def test_a_run_with_transfer_networks_resumes_bit_exactly(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    extra = ["distill.enabled=false", "train.max_steps=6", "train.checkpoint_every=2",
             "train.eval_every=3"]  # fmt: skip
    runs = {}
    for name, crash in (("a", None), ("b", 4)):
        cfg = tiny_dense_config(tiny_cache, tmp_path / name, *extra, preset=XTASK)
        phase, _ = fit_interrupted(cfg, tmp_path / name, "student", crash, monkeypatch)
        runs[name] = phase.module.state_dict()
    a, b = runs["a"], runs["b"]
    transfer = [k for k in a if k.startswith("objective.joint.xtask.terms.transfers.")]
    assert len({k.split(".")[5] for k in transfer}) == 6  # every ordered pair of 3 tasks
    assert [k for k in a if ".projectors." in k]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["dense.transfer.consistency.weight=-1"], "dense.transfer.consistency.weight"),
        (["dense.transfer.alignment.weight=nan"], "dense.transfer.alignment.weight"),
        (["dense.transfer.cycle.rampup_steps=-2"], "dense.transfer.cycle.rampup_steps"),
        (["dense.transfer.class_distance=l2"], "kl, ce"),
        (["dense.transfer.temperature=0"], "dense.transfer.temperature"),
        (["dense.transfer.embed_dim=0"], "dense.transfer.embed_dim"),
        (["dense.transfer.widths=[]"], "dense.transfer.widths"),
        (["dense.transfer.pairs=[[semantic, semantic]]"], "dense.transfer.pairs"),
        (["dense.transfer.pairs=[[semantic, albedo]]"], "dense.transfer.pairs"),
        (["dense.transfer.pairs=[[semantic, depth], [semantic, depth]]"], "twice"),
        (["dense.transfer.pairs=[[semantic, depth]]", "dense.transfer.cycle.weight=1"], "both"),
        (["distill.contrastive_temperature=0"], "distill.contrastive_temperature"),
        (["distill.contrastive_weight=-0.1"], "distill.contrastive_weight"),
    ],
)
def test_bad_cross_task_settings_are_refused_naming_the_key(
    override: list[str], needle: str, tiny_cache: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=needle):
        tiny_dense_config(tiny_cache, tmp_path, *override, preset=XTASK)


def test_cross_task_terms_need_a_dense_run() -> None:
    from unirep.pipeline.validate import load_config

    with pytest.raises(
        ConfigError, match=r"'dense\.transfer\.consistency\.weight' applies to dense runs only"
    ):
        load_config("mini-decathlon", ["dense.transfer.consistency.weight=0.1"])
    cfg = load_config("mini-decathlon", ["distill.contrastive_weight=0.5"])  # classification too
    assert cfg.distill.contrastive_weight == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["uncertainty", "pcgrad"])
def test_cross_task_terms_train_with_partial_labels_and_any_weighting(
    weighting: str, tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alignment on one label per image, under a loss weighting and a gradient method: the
    student and the transfer networks train, every value stays finite."""
    torch.set_num_threads(1)
    extra = [
        "dense.partial.method=none",
        "distill.enabled=false",
        "dense.transfer.alignment.weight=0.5",
        "dense.transfer.consistency.weight=0.1",
        f"weighting={weighting}",
    ]
    cfg = tiny_dense_config(tiny_cache, tmp_path / "a", *extra, "train.max_steps=3",
                            preset="mini-scenes-onelabel")  # fmt: skip
    phase, result = fit_interrupted(cfg, tmp_path / "a", "student", None, monkeypatch)
    state = phase.module.state_dict()
    transfer = {k: v for k, v in state.items() if ".transfers." in k}
    assert transfer
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    fresh = tiny_dense_config(tiny_cache, tmp_path / "b", *extra, "train.max_steps=1",
                              preset="mini-scenes-onelabel")  # fmt: skip
    before, _ = fit_interrupted(fresh, tmp_path / "b", "student", None, monkeypatch)
    moved = [k for k, v in transfer.items() if not torch.equal(v, before.module.state_dict()[k])]
    assert moved and result.skipped_steps == 0
