"""Partial labels through the pipeline: masked training data, teachers on their own labels, the
split saved with the run, joint-task terms trained, checkpointed, resumed and never exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from unirep.stage_one.keys import teacher_path
from unirep.stage_one.train import ensure_teachers

from tests.conftest import fit_interrupted, tiny_dense_config
from unirep.batch import make_batch
from unirep.data.dense.label_splits import MTPSL_TASK_ORDER, make_label_mask, read_label_split
from unirep.data.dense.mtan import write_mtan_fixture
from unirep.errors import DataError
from unirep.pipeline.export import read_student
from unirep.pipeline.rundir import prepare_run_dir
from unirep.pipeline.stage_two import distill, resolve_data, student_phase

ONE_LABEL = "mini-scenes-onelabel"


def _data(cache: Path, out: Path, *extra: str, preset: str = ONE_LABEL):
    cfg = tiny_dense_config(cache, out, *extra, preset=preset)
    return cfg, resolve_data(cfg, Accelerator(cpu=True))


def test_training_samples_carry_the_split_and_teachers_see_their_labels(
    tiny_cache: Path, tmp_path: Path
) -> None:
    cfg, data = _data(tiny_cache, tmp_path)
    tasks = list(data.tasks())
    mask = data.label_mask()
    train = data.datasets("train", train=True)["images"]
    assert mask.shape == (len(train), len(tasks)) and bool((mask.sum(1) == 1).all())
    sample = train[0]
    assert sample["label_mask"] == dict(zip(tasks, mask[0].tolist(), strict=True))
    batch = make_batch({"images": torch.utils.data.default_collate([train[i] for i in range(4)])},
                       data.tasks())  # fmt: skip
    for j, t in enumerate(tasks):
        assert torch.equal(batch.label_mask[t], mask[:4, j])
    for split in ("val", "test"):  # only training labels are partial
        assert "label_mask" not in data.datasets(split)["images"][0]
    for j, t in enumerate(tasks):
        assert len(data.labelled_train_set(t)) == int(mask[:, j].sum())
    prints = {t: data.fingerprint(t) for t in tasks}
    assert len(set(prints.values())) == len(tasks)  # each teacher's data differs
    _, full = _data(tiny_cache, tmp_path, preset="mini-scenes")
    assert full.fingerprint(tasks[0]) not in prints.values()
    assert teacher_path(cfg, data, tasks[0]) != teacher_path(
        tiny_dense_config(tiny_cache, tmp_path), full, tasks[0]
    )
    # the split is reproducible from the seed and changes with it
    _, again = _data(tiny_cache, tmp_path)
    assert torch.equal(again.label_mask(), mask)
    _, other = _data(tiny_cache, tmp_path, "seed=1")
    assert not torch.equal(other.label_mask(), mask)


def test_the_split_is_saved_read_back_and_never_rewritten(tiny_cache: Path, tmp_path: Path) -> None:
    _, data = _data(tiny_cache, tmp_path, "dense.partial.protocol=random-labels")
    data.save_records(tmp_path)
    path = tmp_path / "label_split.json"
    saved = json.loads(path.read_text())
    assert saved["protocol"] == "random-labels" and saved["tasks"] == list(data.tasks())
    mask = read_label_split(path, list(data.tasks()), len(saved["labels"]))
    assert torch.equal(mask, data.label_mask())
    data.save_records(tmp_path)  # a resumed run checks it, and leaves it
    assert json.loads(path.read_text()) == saved
    # a user's split file drives the run; one that does not match the data is refused
    _, from_file = _data(
        tiny_cache, tmp_path, "dense.partial.protocol=file", f"dense.partial.file={path}"
    )
    assert torch.equal(from_file.label_mask(), mask)
    unlabelled = tmp_path / "unlabelled.json"  # random-labels forbids an image without labels
    rows = [list(r) for r in saved["labels"]]
    rows[0] = [0] * len(rows[0])
    unlabelled.write_text(json.dumps({**saved, "labels": rows}))
    with pytest.raises(DataError, match=r"unlabelled\.json.*no label"):
        _data(
            tiny_cache, tmp_path, "dense.partial.protocol=file", f"dense.partial.file={unlabelled}"
        )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**saved, "labels": saved["labels"][:-1]}))
    with pytest.raises(DataError, match=r"bad\.json.*11 label rows"):  # when the data resolves
        _data(tiny_cache, tmp_path, "dense.partial.protocol=file", f"dense.partial.file={bad}")


def test_mtpsl_settings_file_is_imported(tiny_cache: Path, tmp_path: Path) -> None:
    _, data = _data(tiny_cache, tmp_path)
    n = data.label_mask().shape[0]
    weights = torch.zeros(n, 3)
    weights[torch.arange(n), torch.arange(n) % 3] = 1.0
    path = tmp_path / "onelabel.pth"
    torch.save({"labels_weights": weights}, path)
    _, imported = _data(
        tiny_cache, tmp_path, "dense.partial.protocol=file", f"dense.partial.file={path}",
        "dense.partial.file_tasks=[semantic, depth, normal]",
    )  # fmt: skip
    tasks = list(imported.data.tasks)
    expected = weights.bool()[:, [["semantic", "depth", "normal"].index(t) for t in tasks]]
    assert torch.equal(imported.label_mask(), expected)


@pytest.mark.parametrize(
    ("preset", "n", "protocol", "fixture"),
    [
        ("nyuv2-onelabel", 795, "one-label", {"classes": 13}),
        ("nyuv2-random", 795, "random-labels", {"classes": 13}),
        (
            "cityscapes-onelabel",
            2975,
            "one-label",
            {"classes": 7, "with_normals": False, "label_dir": "label_7"},
        ),
    ],
)
def test_a_published_split_indexes_the_whole_training_folder(
    tiny_cache: Path, tmp_path: Path, preset: str, n: int, protocol: str, fixture: dict
) -> None:
    """MTPSL's settings files (795 × 3 for NYUv2, 2975 × 2 for Cityscapes: one row per image of
    the training folder) on a training folder of that size in the MTAN format, with the presets'
    carved validation (dense.val_fraction 0.1): each training image gets its folder row, the
    validation images keep every label, label_split.json records the mapping."""
    root = tmp_path / "data"
    write_mtan_fixture(root, "train", n, 2, 3, seed=0, **fixture)
    write_mtan_fixture(root, "val", 2, 2, 3, seed=1, **fixture)
    order = list(MTPSL_TASK_ORDER[preset.split("-")[0]])
    weights = make_label_mask(protocol, n, order, seed=7).float()
    settings = (
        tmp_path / "settings" / ("onelabel.pth" if protocol == "one-label" else "randomlabels.pth")
    )
    settings.parent.mkdir()
    torch.save({"labels_weights": weights}, settings)
    base = [f"data.root={root}", "data.num_workers=0", "dense.partial.protocol=file"]

    def run_data(split_file: Path):
        return _data(tiny_cache, tmp_path, *base, f"dense.partial.file={split_file}", preset=preset)

    _, data = run_data(settings)
    tasks = list(data.tasks())
    train = data.datasets("train", train=True)["images"]
    val = data.datasets("val")["images"]
    ids = [int(i) for i in data.data.dataset("train").indices]
    held_out = [int(i) for i in val.indices]
    n_val = round(n * 0.1)
    assert len(train) == n - n_val and len(held_out) == n_val
    assert sorted(ids + held_out) == list(range(n))  # carved from the whole folder
    expected = weights.bool()[ids][:, [order.index(t) for t in tasks]]
    assert torch.equal(data.label_mask(), expected)
    for i in (0, len(train) // 2, len(train) - 1):  # the sample is folder image ids[i]
        sample = train[i]
        assert int(sample["index"]) == ids[i]
        row = weights[ids[i]].bool().tolist()
        assert sample["label_mask"] == {t: row[order.index(t)] for t in tasks}
    assert "label_mask" not in val[0]  # validation keeps full ground truth
    for j, t in enumerate(tasks):
        assert len(data.labelled_train_set(t)) == int(expected[:, j].sum())
    data.save_records(tmp_path)
    record = json.loads((tmp_path / "label_split.json").read_text())
    assert record["image_ids"] == ids and record["validation_images"] == held_out
    assert record["folder_images"] == n and record["protocol"] == "file" and record["seed"] is None
    assert record["source"] == {"file": str(settings), "rows": n, "row_of": "folder"}
    assert torch.equal(
        read_label_split(tmp_path / "label_split.json", tasks, len(ids), ids), expected
    )
    data.save_records(tmp_path)  # a resumed run checks the record and leaves it
    # the run's own record (one row per training image) drives a run the same way
    _, again = run_data(tmp_path / "label_split.json")
    assert torch.equal(again.label_mask(), expected)
    # a settings file sized to the carved split keeps working (row i = training image i)
    carved = tmp_path / "carved.pth"
    torch.save({"labels_weights": weights[: len(ids)]}, carved)
    _, sized = run_data(carved)
    assert torch.equal(
        sized.label_mask(), weights.bool()[: len(ids)][:, [order.index(t) for t in tasks]]
    )
    # any other count is refused in one line: the file, both counts, the keys that set them
    wrong = tmp_path / "wrong.pth"
    torch.save({"labels_weights": weights[:-1]}, wrong)
    with pytest.raises(DataError) as err:
        run_data(wrong)
    message = str(err.value)
    assert str(wrong) in message and f"has {n - 1} label rows" in message
    assert f"({len(ids)})" in message and f"({n}," in message and "\n" not in message
    assert "dense.val_fraction / dense.val_folder" in message


def _student(cfg, run_dir: Path, crash_at: int | None, monkeypatch: pytest.MonkeyPatch):
    """Train the partial-label student (no teachers needed: distill.enabled=false)."""
    torch.set_num_threads(1)
    phase, _ = fit_interrupted(cfg, run_dir, "student", crash_at, monkeypatch)
    return phase.module


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mtpsl", "jtr"])
def test_a_run_with_a_joint_task_term_resumes_bit_exactly(
    method: str, tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = [f"dense.partial.method={method}", "distill.enabled=false", "train.max_steps=6",
             "train.checkpoint_every=2", "train.eval_every=3"]  # fmt: skip
    whole = _student(tiny_dense_config(tiny_cache, tmp_path / "a", *extra, preset=ONE_LABEL),
                     tmp_path / "a", None, monkeypatch)  # fmt: skip
    cut = _student(tiny_dense_config(tiny_cache, tmp_path / "b", *extra, preset=ONE_LABEL),
                   tmp_path / "b", 4, monkeypatch)  # fmt: skip
    a, b = whole.state_dict(), cut.state_dict()
    joint = [k for k in a if k.startswith(f"objective.joint.{method}.")]
    assert joint, "the joint term's network is part of the trainable module"
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # it trained: its parameters moved from their initialisation
    one_step = tiny_dense_config(tiny_cache, tmp_path / "c", *extra, "train.max_steps=1",
                                 preset=ONE_LABEL)  # fmt: skip
    fresh = _student(one_step, tmp_path / "c", None, monkeypatch)
    moved = [
        k
        for k in joint
        if a[k].is_floating_point() and not torch.equal(a[k], fresh.state_dict()[k])
    ]
    assert moved


@pytest.mark.slow
def test_partial_run_end_to_end(tiny_cache: Path, tmp_path: Path) -> None:
    """Teachers on their labels, the student distilled with MTPSL, Δm against the baseline and
    the full-label teachers (trained here first), the split in the run folder, nothing of the
    mapping network exported."""
    accelerator = Accelerator(cpu=True)
    full = tiny_dense_config(tiny_cache, tmp_path, "name=full", "baseline=false")
    full_data = resolve_data(full, accelerator)
    ensure_teachers(full, accelerator, full_data, prepare_run_dir(full, accelerator))
    cfg = tiny_dense_config(tiny_cache, tmp_path, "name=part", preset=ONE_LABEL)
    data = resolve_data(cfg, accelerator)
    run_dir = prepare_run_dir(cfg, accelerator)
    metrics = distill(
        cfg, accelerator, data, run_dir, ensure_teachers(cfg, accelerator, data, run_dir)
    )
    summary = metrics["summary"]
    assert summary["partial"]["protocol"] == "one-label" and summary["partial"]["method"] == "mtpsl"
    labels = summary["partial"]["labels"]
    assert labels["unlabelled_images"] == 0
    assert sum(labels["labels_per_task"].values()) == labels["num_images"]  # one label each
    assert summary["delta_m_vs_baseline"] is not None
    assert summary["delta_m_vs_full_label_teachers"] is not None
    for task in metrics["tasks"].values():
        assert set(task) == {"student", "teacher", "baseline", "full_label_teacher"}
    assert (run_dir / "label_split.json").is_file()
    for t in data.tasks():  # each teacher saw only its labelled images
        manifest = json.loads((teacher_path(cfg, data, t) / "teacher.json").read_text())
        assert manifest["data"]["num_samples"] == len(data.labelled_train_set(t))
    _, weights = read_student(run_dir / "student")
    assert not [k for k in weights if "joint" in k or "objective" in k]
    assert "mtpsl/loss" in {s for s in _series(run_dir / "logs" / "student.csv")}


def _series(path: Path) -> set[str]:
    return {line.split(",")[1].removeprefix("train/") for line in path.read_text().splitlines()[1:]}


@pytest.mark.parametrize(
    ("preset", "override", "needle"),
    [
        ("mini-decathlon", "dense.partial.protocol=one-label", "applies to dense runs only"),
        ("mini-scenes", "dense.partial.protocol=half", "dense.partial.protocol"),
        ("mini-scenes", "dense.partial.method=mixup", "dense.partial.method"),
        ("mini-scenes", "dense.partial.protocol=file", "dense.partial.file"),
        ("mini-scenes", "dense.partial.file=/nowhere/split.json", "dense.partial.file"),
        ("mini-scenes", "dense.partial.fraction=1.5", "dense.partial.fraction"),
        ("mini-scenes", "dense.partial.fractions={edges: 0.5}", "edges"),
        ("mini-scenes", "dense.partial.file_tasks=[semantic, edges]", "edges"),
        ("mini-scenes", "dense.partial.weight=-1", "dense.partial.weight"),
        ("mini-scenes", "dense.partial.rampup_steps=-5", "dense.partial.rampup_steps"),
        ("mini-scenes", "dense.partial.mtpsl.film_lr=0", "dense.partial.mtpsl.film_lr"),
        ("mini-scenes", "dense.partial.mtpsl.mode=half", "dense.partial.mtpsl.mode"),
        ("mini-scenes", "dense.partial.jtr.widths=[0]", "dense.partial.jtr.widths"),
        (
            "mini-scenes",
            "dense.partial.jtr.distance_weight=.nan",
            "dense.partial.jtr.distance_weight",
        ),
    ],
)
def test_bad_partial_settings_are_refused_before_work(
    tiny_cache: Path, tmp_path: Path, preset: str, override: str, needle: str
) -> None:
    from unirep.errors import ConfigError
    from unirep.pipeline.validate import load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(preset, [override, f"output_dir={tmp_path}"])


def test_one_task_runs_refuse_pairwise_methods() -> None:
    from unirep.errors import ConfigError
    from unirep.pipeline.validate import load_config

    one = "dense.tasks={depth: {loss: depth_l1}}"
    with pytest.raises(ConfigError, match="mtpsl maps between tasks"):
        load_config("mini-scenes", [one, "dense.partial.method=mtpsl", "distill.lambda_feature={}"])
    with pytest.raises(ConfigError, match="random-labels needs at least 2 tasks"):
        load_config("mini-scenes", [one, "dense.partial.protocol=random-labels",
                                    "distill.lambda_feature={}"])  # fmt: skip


def test_joint_term_cost_is_measured_against_the_number_of_tasks() -> None:
    from unirep.experiments.benchmark import format_joint_scaling, joint_term_scaling

    rows = joint_term_scaling(batch=4, size=(16, 16), task_counts=(2, 4), repeats=1)
    assert [int(r["tasks"]) for r in rows] == [2, 4]
    assert all(r["mtpsl_seconds"] > 0 and r["jtr_seconds"] > 0 for r in rows)
    assert rows[1]["mtpsl_pairs"] > rows[0]["mtpsl_pairs"]  # pairs grow faster than tasks
    assert "| 4 |" in format_joint_scaling(rows)


@pytest.mark.parametrize("method", ["none", "mtpsl", "jtr"])
def test_an_all_unlabelled_batch_gives_finite_zero_supervision(
    method: str, tiny_cache: Path, tmp_path: Path
) -> None:
    """No sample of the batch is labelled for any task: the supervised terms are exact zeros with
    zero gradient, the joint terms finite (no NaN from an empty mean)."""
    cfg, data = _data(
        tiny_cache, tmp_path, f"dense.partial.method={method}", "distill.enabled=false"
    )
    tasks = data.tasks()
    reference = {n: {t.main_metric: 1.0} for n, t in tasks.items()}
    accelerator = Accelerator(cpu=True)
    phase, _ = student_phase(
        cfg, accelerator, "student", data, tasks, tmp_path, {}, reference, True
    )
    samples = [data.datasets("train", train=True)["images"][i] for i in range(4)]
    for s in samples:
        s["label_mask"] = dict.fromkeys(tasks, False)
    batch = make_batch({"images": torch.utils.data.default_collate(samples)}, tasks)
    bundle = phase.module(batch)
    for loss in bundle.supervised.values():
        assert loss.item() == 0.0
    total = bundle.total()
    assert torch.isfinite(total)
    total.backward()
    for p in phase.module.student.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_a_batch_larger_than_a_teachers_labelled_images_is_refused(
    tiny_cache: Path, tmp_path: Path
) -> None:
    from unirep.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.batch_size.*teacher of .* labelled for it"):
        _data(tiny_cache, tmp_path, "data.batch_size=6")  # 12 scenes, one label each: 4 per task
