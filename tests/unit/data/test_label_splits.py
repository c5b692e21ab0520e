"""Label protocols for partially labelled dense multi-task learning
(:mod:`unirep.data.dense.label_splits`)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from unirep.data.dense.label_splits import (
    MTPSL_TASK_ORDER,
    PROTOCOLS,
    SPLIT_FORMAT,
    describe,
    import_mtpsl,
    make_label_mask,
    read_label_split,
    split_rows,
    write_label_split,
)
from unirep.data.dense.sources import carve
from unirep.errors import ConfigError, DataError

NYU = ["semantic", "depth", "normal"]


def test_protocol_names() -> None:
    assert PROTOCOLS == ("full", "one-label", "random-labels", "fraction", "file")


# --- make_label_mask ---------------------------------------------------------------------------


def test_full_is_all_true() -> None:
    mask = make_label_mask("full", 7, NYU, seed=0)
    assert mask.dtype == torch.bool and mask.shape == (7, 3) and bool(mask.all())


@pytest.mark.parametrize(
    ("n", "t"), [(795, 3), (12, 3), (10, 3), (2975, 2), (7, 2), (5, 4), (3, 5), (0, 3)]
)
def test_one_label_counts_and_balance(n: int, t: int) -> None:
    tasks = [f"task{j}" for j in range(t)]
    mask = make_label_mask("one-label", n, tasks, seed=3)
    assert mask.dtype == torch.bool and mask.shape == (n, t)
    assert bool((mask.sum(dim=1) == 1).all())
    counts = mask.sum(dim=0)
    assert int(counts.sum()) == n
    assert int(counts.max() - counts.min()) <= (0 if n % t == 0 else 1)
    assert sorted(counts.tolist()) == sorted([n // t + (j < n % t) for j in range(t)])


def test_one_label_extra_task_and_order_are_seeded() -> None:
    extras = set()
    for seed in range(20):
        counts = make_label_mask("one-label", 10, NYU, seed=seed).sum(dim=0)
        extras.add(int(counts.argmax()))
    assert extras == {0, 1, 2}  # the task with the 4th image is not always the first
    mask = make_label_mask("one-label", 795, NYU, seed=0)
    assert not bool(mask[:265, 0].all())  # assignment is shuffled, not in blocks


@pytest.mark.parametrize("t", [2, 3, 5])
def test_random_labels_never_empty_or_full(t: int) -> None:
    tasks = [f"task{j}" for j in range(t)]
    per_image = make_label_mask("random-labels", 2000, tasks, seed=1).sum(dim=1)
    assert bool((per_image >= 1).all()) and bool((per_image <= t - 1).all())


def test_random_labels_roughly_uniform_over_subsets() -> None:
    n = 6000
    mask = make_label_mask("random-labels", n, NYU, seed=0)
    subsets = Counter(tuple(row) for row in mask.int().tolist())
    assert len(subsets) == 6  # 2^3 − 2
    for count in subsets.values():  # expected 1000, sd ≈ 29: a 5-sd band
        assert 850 < count < 1150, subsets
    # per-image label counts follow the subset sizes: 3 subsets of 1, 3 of 2
    per_image = Counter(mask.sum(dim=1).tolist())
    assert 2850 < per_image[1] < 3150


def test_random_labels_refuses_one_task() -> None:
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        make_label_mask("random-labels", 10, ["depth"], seed=0)


@pytest.mark.parametrize(
    ("protocol", "fraction"), [("one-label", None), ("random-labels", None), ("fraction", 0.5)]
)
def test_determinism(protocol: str, fraction: float | None) -> None:
    a = make_label_mask(protocol, 200, NYU, seed=5, fraction=fraction)
    b = make_label_mask(protocol, 200, NYU, seed=5, fraction=fraction)
    c = make_label_mask(protocol, 200, NYU, seed=6, fraction=fraction)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_untouched() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for protocol, fraction in [("one-label", None), ("random-labels", None), ("fraction", 0.3)]:
        make_label_mask(protocol, 50, NYU, seed=0, fraction=fraction)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("f", [0.0, 0.1, 0.3, 0.5, 0.77, 1.0])
def test_fraction_counts_exact(f: float) -> None:
    n = 101
    mask = make_label_mask("fraction", n, NYU, seed=2, fraction=f)
    assert mask.sum(dim=0).tolist() == [round(f * n)] * 3
    if f == 1.0:
        assert bool(mask.all())
    if f == 0.0:
        assert not bool(mask.any())


def test_fraction_per_task_dict_and_independent_columns() -> None:
    n = 400
    fractions = {"normal": 0.25, "semantic": 0.5, "depth": 1.0}
    mask = make_label_mask("fraction", n, NYU, seed=0, fraction=fractions)
    assert mask.sum(dim=0).tolist() == [200, 400, 100]
    same = make_label_mask("fraction", n, ["a", "b"], seed=0, fraction=0.5)
    assert not torch.equal(same[:, 0], same[:, 1])  # chosen independently per task
    assert int((~same.any(dim=1)).sum()) > 0  # an image may end up with no label


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"protocol": "half"}, "unknown; known: full, one-label"),
        ({"protocol": "file"}, "read_label_split"),
        ({"tasks": []}, "empty"),
        ({"tasks": ["depth", "depth"]}, "more than once"),
        ({"num_images": -1}, "non-negative"),
        ({"seed": 1.5}, "seed"),
        ({"protocol": "fraction"}, "needs fraction"),
        ({"protocol": "fraction", "fraction": 1.5}, r"\[0, 1\]"),
        ({"protocol": "fraction", "fraction": -0.1}, r"\[0, 1\]"),
        ({"protocol": "fraction", "fraction": float("nan")}, r"\[0, 1\]"),
        ({"protocol": "fraction", "fraction": True}, "number"),
        ({"protocol": "fraction", "fraction": {"semantic": 0.5, "depth": 0.5}}, "no value"),
        ({"protocol": "fraction", "fraction": {**dict.fromkeys(NYU, 0.5), "edge": 0.1}}, "edge"),
        ({"protocol": "fraction", "fraction": {**dict.fromkeys(NYU, 0.5), "depth": 2}}, "depth"),
        ({"protocol": "one-label", "fraction": 0.5}, "only used by protocol 'fraction'"),
    ],
)
def test_make_label_mask_refuses(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"protocol": "one-label", "num_images": 10, "tasks": NYU, "seed": 0}
    with pytest.raises(ConfigError, match=match):
        make_label_mask(**{**args, **kwargs})


# --- label-split files ---------------------------------------------------------------------------


def ids(n: int) -> list[str]:
    return [f"{i:04d}" for i in range(n)]


def test_write_read_round_trip(tmp_path: Path) -> None:
    mask = make_label_mask("random-labels", 30, NYU, seed=0)
    path = tmp_path / "splits" / "random.json"
    write_label_split(path, mask, NYU, ids(30), "random-labels", 0)
    data = json.loads(path.read_text())
    assert list(data) == ["format", "protocol", "seed", "tasks", "image_ids", "labels"]
    assert data["format"] == SPLIT_FORMAT == "unirep-label-split/1"
    assert data["protocol"] == "random-labels" and data["seed"] == 0 and data["tasks"] == NYU
    assert data["labels"] == mask.int().tolist()
    assert [p.name for p in path.parent.iterdir()] == ["random.json"]  # no temporary left
    back = read_label_split(path, NYU, 30, image_ids=ids(30), require_label=True)
    assert back.dtype == torch.bool and torch.equal(back, mask)
    assert torch.equal(read_label_split(path, NYU, 30), mask)  # ids optional on read


def test_read_reorders_tasks(tmp_path: Path) -> None:
    mask = make_label_mask(
        "fraction", 40, NYU, seed=1, fraction={"semantic": 0.1, "depth": 0.5, "normal": 0.9}
    )
    order = [2, 0, 1]
    path = tmp_path / "split.json"
    write_label_split(path, mask[:, order], [NYU[j] for j in order], None, "fraction", 1)
    assert "image_ids" not in json.loads(path.read_text())
    assert torch.equal(read_label_split(path, NYU, 40, image_ids=ids(40)), mask)


def test_write_accepts_integer_ids_and_01_masks(tmp_path: Path) -> None:
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    path = tmp_path / "s.json"
    write_label_split(path, mask, ["semantic", "depth"], [torch.tensor(7).item(), 9], "file", None)
    back = read_label_split(path, ["semantic", "depth"], 2, image_ids=[7, 9])
    assert torch.equal(back, mask.bool())
    assert json.loads(path.read_text())["seed"] is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask": torch.ones(3, 2, dtype=torch.bool)}, "columns"),
        ({"mask": torch.ones(3)}, "2-D"),
        ({"mask": torch.full((3, 3), 2)}, "0/1"),
        ({"image_ids": ids(2)}, "2 image ids"),
        ({"image_ids": ["a", "a", "b"]}, "unique"),
        ({"image_ids": [1.5, 2, 3]}, "strings or integers"),
        ({"seed": "0"}, "seed"),
    ],
)
def test_write_refuses(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "path": tmp_path / "s.json",
        "mask": torch.ones(3, 3, dtype=torch.bool),
        "tasks": NYU,
        "image_ids": ids(3),
        "protocol": "full",
        "seed": 0,
    }
    with pytest.raises(ValueError, match=match):
        write_label_split(**{**args, **kwargs})
    assert not (tmp_path / "s.json").exists()


def valid_split() -> dict[str, Any]:
    return {
        "format": SPLIT_FORMAT,
        "protocol": "one-label",
        "seed": 0,
        "tasks": list(NYU),
        "image_ids": ids(4),
        "labels": [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]],
    }


def _set(key: str, value: Any):
    return lambda d: d.update({key: value})


def _row(i: int, row: Any):
    return lambda d: d["labels"].__setitem__(i, row)


def _drop_task(d: dict[str, Any]) -> None:
    d["tasks"] = d["tasks"][:2]
    d["labels"] = [row[:2] for row in d["labels"]]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["labels"].pop(), "has 3 label rows but the training split has 4"),
        (lambda d: d["image_ids"].pop(), "3 image ids"),
        (_set("tasks", ["semantic", "depth", "edge"]), r"unknown task\(s\) \['edge'\]"),
        (_drop_task, r"no labels for task\(s\) \['normal'\]"),
        (_set("tasks", ["semantic", "depth", "depth"]), "more than once"),
        (_row(1, [0, 2, 0]), "row 1 holds 2; label values must be the integers 0 or 1"),
        (_row(1, [0, "1", 0]), "row 1 holds '1'"),
        (_row(1, [0, True, 0]), "row 1 holds True"),
        (_row(1, [0, 1.0, 0]), "row 1 holds 1.0"),
        (_row(2, [0, 1]), "row 2 has 2 values, expected 3"),
        (_row(2, [0, 1, 0, 0]), "row 2 has 4 values, expected 3"),
        (_row(2, 1), "row 2 has a number, expected 3"),
        (_set("image_ids", ["0000", "0001", "0003", "0002"]), "image id 2 is '0003'"),
        (_set("format", "unirep-label-split/2"), "format is 'unirep-label-split/2'"),
        (lambda d: d.pop("format"), "format is None"),
        (lambda d: d.pop("labels"), r"missing key\(s\) \['labels'\]"),
        (_set("weights", []), r"unknown key\(s\) \['weights'\]"),
        (_set("labels", {"0000": [1, 0, 0]}), "'labels' must be a list"),
        (_set("tasks", "semantic"), "'tasks' must be a list"),
    ],
)
def test_read_refuses(tmp_path: Path, edit: Any, match: str) -> None:
    data = valid_split()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=match) as err:
        read_label_split(path, NYU, 4, image_ids=ids(4))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"format": "unirep-label-split/1", "labels": [', "not valid JSON"),
        ("", "not valid JSON"),
        ("[[1, 0, 0]]", "must hold a JSON object"),
    ],
)
def test_read_refuses_bad_json(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        read_label_split(path, NYU, 4)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_read_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_label_split(tmp_path / "absent.json", NYU, 4)


def test_read_require_label(tmp_path: Path) -> None:
    data = valid_split()
    data["labels"][1] = [0, 0, 0]
    data["labels"][3] = [0, 0, 0]
    path = tmp_path / "holes.json"
    path.write_text(json.dumps(data))
    mask = read_label_split(path, NYU, 4)  # fraction-style splits may leave images unlabelled
    assert mask.sum(dim=1).tolist() == [1, 0, 1, 0]
    with pytest.raises(DataError, match=r"2 image\(s\) have no label, first image 1 \(id '0001'\)"):
        read_label_split(path, NYU, 4, require_label=True)


# --- MTPSL settings files -----------------------------------------------------------------------


def mtpsl_onelabel() -> torch.Tensor:
    """Like the shipped ``nyuv2_settings/onelabel.pth``: FloatTensor[795, 3], 265 per task."""
    gen = torch.Generator().manual_seed(0)
    column = torch.arange(3).repeat_interleave(265)[torch.randperm(795, generator=gen)]
    return torch.nn.functional.one_hot(column, 3).float()


def test_import_mtpsl_shipped_layout(tmp_path: Path) -> None:
    weights = mtpsl_onelabel()
    assert weights.dtype == torch.float32 and weights.shape == (795, 3)
    path = tmp_path / "onelabel.pth"
    torch.save({"labels_weights": weights}, path)
    mask = import_mtpsl(path, list(MTPSL_TASK_ORDER["nyuv2"]))
    assert mask.dtype == torch.bool and torch.equal(mask, weights.bool())
    summary = describe(mask, NYU)
    assert summary["labels_per_task"] == {"semantic": 265, "depth": 265, "normal": 265}
    assert summary["labels_per_image"] == {"0": 0, "1": 795, "2": 0, "3": 0}
    # converted to a label split and read back in another task order: same counts
    split = tmp_path / "onelabel.json"
    write_label_split(split, mask, NYU, None, "one-label", None)
    order = ["normal", "semantic", "depth"]
    back = read_label_split(split, order, 795, require_label=True)
    assert describe(back, order)["labels_per_task"] == {
        "normal": 265,
        "semantic": 265,
        "depth": 265,
    }
    assert torch.equal(back, mask[:, [2, 0, 1]])


def test_import_mtpsl_bare_tensor(tmp_path: Path) -> None:
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    path = tmp_path / "bare.pth"
    torch.save(weights, path)
    mask = import_mtpsl(path, list(MTPSL_TASK_ORDER["cityscapes"]))
    assert torch.equal(mask, weights.bool())


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"weights": torch.ones(4, 3)}, "single key 'labels_weights'"),
        ({"labels_weights": torch.ones(4, 3), "extra": 1}, "single key 'labels_weights'"),
        ({"labels_weights": torch.ones(12)}, r"2-D tensor \[N, T\], got a tensor of shape \[12\]"),
        ({"labels_weights": torch.ones(4, 3, 1)}, "2-D"),
        ({"labels_weights": [[1.0, 0.0, 0.0]]}, "got a list"),
        ({"labels_weights": torch.ones(4, 2)}, "has 2 columns but task_order names 3"),
        ({"labels_weights": torch.zeros(0, 3)}, "no rows"),
        ({"labels_weights": torch.full((4, 3), 0.5)}, "0 or 1"),
        ({"labels_weights": torch.full((4, 3), 2.0)}, "0 or 1"),
        ({"labels_weights": torch.full((4, 3), float("nan"))}, "0 or 1"),
    ],
)
def test_import_mtpsl_refuses(tmp_path: Path, content: Any, match: str) -> None:
    path = tmp_path / "settings.pth"
    torch.save(content, path)
    with pytest.raises(DataError, match=match) as err:
        import_mtpsl(path, NYU)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_import_mtpsl_refuses_unreadable(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        import_mtpsl(tmp_path / "absent.pth", NYU)
    path = tmp_path / "text.pth"
    path.write_text("not a torch file")
    with pytest.raises(DataError, match="cannot be loaded") as err:
        import_mtpsl(path, NYU)
    assert "\n" not in str(err.value)


# --- a published split over the whole training folder -------------------------------------------


def mtpsl_settings(n: int, t: int, protocol: str = "one-label") -> torch.Tensor:
    """A ``labels_weights`` FloatTensor ``[n, t]`` like MTPSL's shipped settings files."""
    return make_label_mask(protocol, n, [f"task{j}" for j in range(t)], seed=5).float()


def test_split_rows_by_training_image_or_by_folder_image() -> None:
    train = [0, 2, 3, 5, 6, 7, 9]  # of a folder of 10; 1, 4, 8 validate
    assert split_rows(7, train, 10, "f") == list(range(7))  # one row per training image
    assert split_rows(10, train, 10, "f") == train  # one row per image of the folder
    assert split_rows(10, list(range(10)), 10, "f") == list(range(10))  # nothing carved
    with pytest.raises(DataError) as err:
        split_rows(8, train, 10, "label split 'x.json'")
    message = str(err.value)
    assert message.startswith("label split 'x.json': has 8 label rows")
    assert "(7)" in message and "(10," in message and "\n" not in message
    assert "dense.val_fraction / dense.val_folder" in message
    whole = r"has 9 label rows but the training split has 10 images, the whole training folder"
    with pytest.raises(DataError, match=whole + r".*dense\.val_folder"):
        split_rows(9, list(range(10)), 10, "f")
    with pytest.raises(ValueError, match="increasing"):
        split_rows(10, [3, 2], 10, "f")
    with pytest.raises(ValueError, match="below folder_images"):
        split_rows(10, [3, 10], 10, "f")


@pytest.mark.parametrize(
    ("dataset", "n", "n_val", "protocol", "file_name"),
    [
        ("nyuv2", 795, 80, "one-label", "onelabel.pth"),
        ("nyuv2", 795, 80, "random-labels", "randomlabels.pth"),
        ("cityscapes", 2975, 298, "one-label", "onelabel.pth"),
    ],
)
def test_mtpsl_shaped_file_maps_onto_the_carved_training_split(
    tmp_path: Path, dataset: str, n: int, n_val: int, protocol: str, file_name: str
) -> None:
    """MTPSL's files, exactly shaped (795 × 3, 2975 × 2, torch.save-d {'labels_weights': float
    tensor}), against the real carve of their training folder (dense.val_fraction 0.1)."""
    order = list(MTPSL_TASK_ORDER[dataset])
    weights = mtpsl_settings(n, len(order), protocol)
    path = tmp_path / f"{dataset}_settings" / file_name
    path.parent.mkdir()
    torch.save({"labels_weights": weights}, path)
    assert torch.load(path, weights_only=True)["labels_weights"].shape == (n, len(order))
    train, val = carve(n, 0.1)
    assert len(val) == n_val and len(train) == n - n_val and not set(train) & set(val)
    full = import_mtpsl(path, order)
    rows = split_rows(full.shape[0], train, n, f"MTPSL settings file {str(path)!r}")
    assert rows == train
    mask = full[rows]
    assert mask.shape == (n - n_val, len(order))
    for i in (0, 1, len(train) // 2, len(train) - 1):  # training image i gets its folder's row
        assert torch.equal(mask[i], weights[train[i]].bool())
    # the same labels written as a whole-folder JSON split read the same way, ids checked
    split = tmp_path / "folder.json"
    write_label_split(split, full, order, list(range(n)), protocol, None)
    back = read_label_split(
        split, order, len(train), image_ids=train, require_label=True,
        folder_indices=train, folder_images=n,
    )  # fmt: skip
    assert torch.equal(back, mask)
    # a file sized to the carved split keeps working; another count names both and the keys
    assert split_rows(len(train), train, n, "f") == list(range(len(train)))
    with pytest.raises(DataError) as err:
        split_rows(n - 1, train, n, f"MTPSL settings file {str(path)!r}")
    message = str(err.value)
    assert str(path) in message and f"({len(train)})" in message and f"({n}," in message
    assert "dense.val_fraction / dense.val_folder" in message and "\n" not in message


def test_whole_folder_json_split_uses_the_training_rows_only(tmp_path: Path) -> None:
    train, folder = [0, 1, 3], 4  # image 2 validates
    data = valid_split()
    data["labels"][2] = [0, 0, 0]  # the validation image's row: unused, so no label is fine
    path = tmp_path / "folder.json"
    path.write_text(json.dumps(data))
    kwargs: dict[str, Any] = {"folder_indices": train, "folder_images": folder}
    train_ids = [ids(4)[i] for i in train]
    mask = read_label_split(path, NYU, 3, image_ids=train_ids, require_label=True, **kwargs)
    assert mask.int().tolist() == [data["labels"][i] for i in train]
    with pytest.raises(DataError, match="image id 3 is '0003' but the training split's is 'x'"):
        read_label_split(path, NYU, 3, image_ids=["0000", "0001", "x"], **kwargs)
    data["labels"][3] = [0, 0, 0]  # a training image without a label is still refused
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"1 image\(s\) have no label, first image 2 \(id '0003'\)"):
        read_label_split(path, NYU, 3, require_label=True, **kwargs)
    with pytest.raises(DataError, match="has 4 label rows but the training split has 3 images"):
        read_label_split(path, NYU, 3)  # without the folder, only one row per training image


def test_the_folder_and_source_records_round_trip(tmp_path: Path) -> None:
    mask = make_label_mask("one-label", 3, NYU, seed=0)
    path = tmp_path / "label_split.json"
    source = {"file": "/mtpsl/nyuv2_settings/onelabel.pth", "rows": 5, "row_of": "folder"}
    write_label_split(
        path, mask, NYU, [0, 2, 4], "file", None,
        folder_images=5, validation_images=[1, 3], source=source,
    )  # fmt: skip
    data = json.loads(path.read_text())
    assert data["folder_images"] == 5 and data["validation_images"] == [1, 3]
    assert data["source"] == source and data["image_ids"] == [0, 2, 4]
    assert torch.equal(read_label_split(path, NYU, 3, image_ids=[0, 2, 4]), mask)
    for key, value, match in [
        ("folder_images", -1, "'folder_images' must be a count"),
        ("validation_images", [1, "3"], "'validation_images' must be a list of folder indices"),
        ("source", {"file": "a"}, "'source' must be an object with the keys"),
        ("source", {**source, "row_of": "row"}, "'row_of' is 'row'"),
    ]:
        path.write_text(json.dumps({**data, key: value}))
        with pytest.raises(DataError, match=match):
            read_label_split(path, NYU, 3)
    with pytest.raises(ValueError, match="folder_images"):
        write_label_split(path, mask, NYU, None, "file", None, folder_images=2)
    with pytest.raises(ValueError, match="source"):
        write_label_split(path, mask, NYU, None, "file", None, source={"file": "a"})


# --- describe -----------------------------------------------------------------------------------


def test_describe_hand_computed() -> None:
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    assert describe(mask, NYU) == {
        "num_images": 4,
        "labels_per_task": {"semantic": 3, "depth": 2, "normal": 1},
        "fraction_per_task": {"semantic": 0.75, "depth": 0.5, "normal": 0.25},
        "labels_per_image": {"0": 1, "1": 1, "2": 1, "3": 1},
        "unlabelled_images": 1,
    }
    empty = describe(torch.zeros(0, 2, dtype=torch.bool), ["semantic", "depth"])
    assert empty["fraction_per_task"] == {"semantic": 0.0, "depth": 0.0}
