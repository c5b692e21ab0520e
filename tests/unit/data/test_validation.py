"""Bad data is refused up front, by ``RunData.prepare``, naming the file: one test per fault.

Each test builds the run's data as :func:`unirep.pipeline.stage_two.resolve_data` does
(``build_run_data(cfg).prepare()``), so a fault in any split (train, val or test) surfaces before
any teacher trains, as a :class:`~unirep.errors.DataError` or
:class:`~unirep.data.classification.decathlon.DataRootError` whose message names the offending file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from unirep.data.classification import stats
from unirep.data.classification.decathlon import DataRootError, DecathlonDomain
from unirep.data.classification.hf import ID_DOMAIN_STRIDE, HFDomain, global_id_offset
from unirep.data.classification.stats import domain_mean_std
from unirep.data.dense.mtan import MTANDense, write_mtan_fixture
from unirep.data.streams import RunData, build_run_data
from unirep.errors import DataError, UnirepError
from unirep.pipeline.validate import load_config

SIZES = {"train": 4, "val": 2, "test": 2}


# ---- a tiny Decathlon-format tree with two domains ------------------------------------------


def _write_domain(root: Path, domain: str, d: int, sizes: dict[str, int] = SIZES) -> None:
    """``annotations/<domain>_{train,val,test}.json`` + 8×12 JPEGs; ids ``d·1000 + k``."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": d * 100 + c, "name": f"{domain}{c}"} for c in (1, 2)]
    k = 0
    for split, count in sizes.items():
        folder = root / "data" / domain / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            k += 1
            name = f"data/{domain}/{split}/{i + 1:06d}.jpg"
            Image.new("RGB", (12, 8), (40 * i, 20 * d, 200)).save(root / name, quality=90)
            images.append({"id": d * 1000 + k, "file_name": name, "width": 12, "height": 8})
            category = categories[i % 2]["id"]
            annotations.append(
                {"id": d * 1000 + k, "image_id": d * 1000 + k, "category_id": category}
            )
        content = {"images": images, "annotations": annotations, "categories": categories}
        _write_json(root / "annotations" / f"{domain}_{split}.json", content)


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content), encoding="utf-8")


def _edit(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    content = json.loads(path.read_text(encoding="utf-8"))
    change(content)
    _write_json(path, content)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "decathlon-1.0"
    _write_domain(root, "alpha", 1)
    _write_domain(root, "beta", 2)
    return root


def _prepare(root: Path, cache: Path, *extra: str) -> RunData:
    cfg = load_config(
        "mini-decathlon",
        ["data.source=decathlon", f"data.root={root}", f"data.cache_dir={cache}", *extra],
    )
    data = build_run_data(cfg)
    data.prepare()
    return data


def _raises(kind: type[Exception], needle: Path | str, root: Path, cache: Path, *extra: str) -> str:
    """Prepare the run and check the error's type and that its message names ``needle``."""
    with pytest.raises(kind) as info:
        _prepare(root, cache, *extra)
    message = str(info.value)
    assert isinstance(info.value, UnirepError) and "\n" not in message
    assert str(needle) in message, message
    return message


def test_a_clean_tree_passes(tree: Path, tmp_path: Path) -> None:
    data = _prepare(tree, tmp_path / "cache")
    assert data.streams() == ["alpha", "beta"] and data.skipped() == []


def test_missing_train_image(tree: Path, tmp_path: Path) -> None:
    missing = tree / "data" / "beta" / "train" / "000003.jpg"
    missing.unlink()
    message = _raises(DataRootError, missing, tree, tmp_path / "cache")
    assert "beta_train.json" in message and "1 of 4" in message


def test_missing_test_image_is_found_before_training(tree: Path, tmp_path: Path) -> None:
    missing = tree / "data" / "alpha" / "test" / "000002.jpg"
    missing.unlink()
    _raises(DataRootError, missing, tree, tmp_path / "cache")


def test_missing_annotation_file(tree: Path, tmp_path: Path) -> None:
    missing = tree / "annotations" / "alpha_val.json"
    missing.unlink()
    _raises(DataRootError, missing, tree, tmp_path / "cache")


def test_category_id_not_in_categories(tree: Path, tmp_path: Path) -> None:
    path = tree / "annotations" / "alpha_val.json"
    _edit(path, lambda c: c["annotations"][1].update(category_id=999))
    message = _raises(DataError, path, tree, tmp_path / "cache")
    assert "category_id 999" in message and "101..102" in message


def test_duplicate_image_id(tree: Path, tmp_path: Path) -> None:
    path = tree / "annotations" / "beta_test.json"
    _edit(path, lambda c: c["images"][1].update(id=c["images"][0]["id"]))
    message = _raises(DataError, path, tree, tmp_path / "cache")
    assert "image id 2007 is listed twice" in message


def test_image_ids_shared_by_two_domains(tree: Path, tmp_path: Path) -> None:
    path = tree / "annotations" / "beta_test.json"
    shared = json.loads((tree / "annotations" / "alpha_test.json").read_text())["images"][0]["id"]

    def reuse(content: dict) -> None:
        old = content["images"][0]["id"]
        content["images"][0]["id"] = shared
        content["annotations"][0].update(id=shared, image_id=shared)
        assert old != shared

    _edit(path, reuse)
    message = _raises(DataError, path, tree, tmp_path / "cache")
    assert f"image id {shared}" in message and "alpha_test.json" in message


def test_malformed_image_entry(tree: Path, tmp_path: Path) -> None:
    path = tree / "annotations" / "alpha_train.json"
    _edit(path, lambda c: c["images"][2].pop("file_name"))
    message = _raises(DataError, path, tree, tmp_path / "cache")
    assert "file_name" in message


@pytest.mark.parametrize("split", ["val", "train"])
def test_empty_split(tree: Path, tmp_path: Path, split: str) -> None:
    path = tree / "annotations" / f"beta_{split}.json"
    _edit(path, lambda c: c.update(images=[], annotations=[]))
    message = _raises(DataError, path, tree, tmp_path / "cache")
    assert "empty" in message


def test_on_corrupt_skip_lists_every_skipped_file(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad_train = tree / "data" / "alpha" / "train" / "000002.jpg"
    bad_test = tree / "data" / "beta" / "test" / "000001.jpg"
    bad_train.write_bytes(b"not a jpeg" * 20)
    bad_test.write_bytes(b"")
    cache = tmp_path / "cache"
    data = _prepare(tree, cache, "data.on_corrupt=skip")
    skipped = sorted(data.skipped(), key=lambda e: e["path"])
    assert [(e["path"], e["split"], e["stream"]) for e in skipped] == [
        (str(bad_train), "train", "alpha"),
        (str(bad_test), "test", "beta"),
    ]
    assert all(e["reason"] for e in skipped)
    assert len(data.datasets("train")["alpha"]) == 3 and len(data.datasets("test")["beta"]) == 1
    # the decoding pass ran once: another process (or run) over the same files reads its result
    monkeypatch.setattr(DecathlonDomain, "_load", lambda *a: pytest.fail("decoded again"))
    again = _prepare(tree, cache, "data.on_corrupt=skip")
    assert sorted(again.skipped(), key=lambda e: e["path"]) == skipped


# ---- statistics cache ------------------------------------------------------------------------


def test_stats_cache_follows_the_files_not_the_path(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    before = domain_mean_std(tree, "alpha", cache)
    image = tree / "data" / "alpha" / "train" / "000001.jpg"
    Image.new("RGB", (12, 8), (255, 255, 255)).save(image, quality=90)  # same path, new pixels
    os.utime(image, ns=(1, 1))  # even with an old mtime, the size or mtime differs
    after = domain_mean_std(tree, "alpha", cache)
    assert after != before
    assert len(list((cache / "stats").iterdir())) == 2

    monkeypatch.setattr(stats, "_compute", lambda *a: pytest.fail("recomputed, files unchanged"))
    assert domain_mean_std(tree, "alpha", cache) == after


# ---- dense (MTAN format) ---------------------------------------------------------------------

H, W = 8, 12


@pytest.fixture
def nyu(tmp_path: Path) -> Path:
    root = tmp_path / "nyuv2"
    write_mtan_fixture(root, "train", 10, H, W, classes=13)
    write_mtan_fixture(root, "val", 4, H, W, classes=13, seed=1)  # MTAN's val = the test split
    return root


def _prepare_dense(root: Path, cache: Path, *extra: str) -> RunData:
    cfg = load_config("nyuv2", [f"data.root={root}", f"data.cache_dir={cache}", *extra])
    data = build_run_data(cfg)
    data.prepare()
    return data


def _dense_raises(root: Path, cache: Path, path: Path, *extra: str) -> str:
    with pytest.raises(DataError) as info:
        _prepare_dense(root, cache, *extra)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    return message


def test_dense_clean_fixture_passes(nyu: Path, tmp_path: Path) -> None:
    data = _prepare_dense(nyu, tmp_path / "cache")
    assert data.skipped() == []


def test_dense_wrong_shape(nyu: Path, tmp_path: Path) -> None:
    path = nyu / "val" / "normal" / "2.npy"
    np.save(path, np.zeros((H, W), np.float32))
    message = _dense_raises(nyu, tmp_path / "cache", path)
    assert f"shape ({H}, {W})" in message and "H×W×3" in message


def test_dense_size_differs_from_the_split(nyu: Path, tmp_path: Path) -> None:
    path = nyu / "train" / "depth" / "5.npy"
    np.save(path, np.ones((H + 2, W, 1), np.float32))
    message = _dense_raises(nyu, tmp_path / "cache", path)
    assert f"{H}×{W}" in message


def test_dense_wrong_dtype(nyu: Path, tmp_path: Path) -> None:
    path = nyu / "val" / "image" / "1.npy"
    np.save(path, np.full((H, W, 3), "x"))
    message = _dense_raises(nyu, tmp_path / "cache", path)
    assert "dtype <U1" in message


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickled"])
def test_dense_unreadable_file(nyu: Path, tmp_path: Path, damage: str) -> None:
    path = nyu / "train" / "label" / "7.npy"
    if damage == "garbage":  # also the first training label map, read early for num_classes
        path = nyu / "train" / "label" / "0.npy"
        for first in (path, nyu / "train" / "label" / "1.npy"):
            first.write_bytes(b"\x00garbage" * 50)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:150])
    else:
        np.save(path, np.array([{"label": 1}], dtype=object), allow_pickle=True)
    message = _dense_raises(nyu, tmp_path / "cache", path)
    assert "not a readable .npy array" in message


def test_dense_nan_depth(nyu: Path, tmp_path: Path) -> None:
    path = nyu / "val" / "depth" / "3.npy"
    depth = np.load(path)
    depth[2, 3] = np.nan
    np.save(path, depth)
    message = _dense_raises(nyu, tmp_path / "cache", path)
    assert "1 NaN or infinite values" in message


def test_dense_infinite_normal(nyu: Path, tmp_path: Path) -> None:
    path = nyu / "train" / "normal" / "4.npy"
    normal = np.load(path)
    normal[0, 0, 1] = np.inf
    np.save(path, normal)
    _dense_raises(nyu, tmp_path / "cache", path)


def test_dense_label_out_of_range(nyu: Path, tmp_path: Path) -> None:
    path = nyu / "val" / "label" / "2.npy"
    label = np.load(path)
    label[1, 1] = 13
    np.save(path, label)
    message = _dense_raises(nyu, tmp_path / "cache", path)
    assert "class id 13" in message and "0..12" in message


def test_dense_ignore_value_255_is_out_of_range(nyu: Path, tmp_path: Path) -> None:
    path = nyu / "train" / "label" / "3.npy"
    np.save(path, np.full((H, W), 255, np.uint8))  # the reader's ignore value is -1, not 255
    _dense_raises(nyu, tmp_path / "cache", path)


def test_dense_skip_and_cached_check(
    nyu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    bad = nyu / "val" / "depth" / "1.npy"
    bad.write_bytes(b"garbage")
    data = _prepare_dense(nyu, cache, "data.on_corrupt=skip")
    assert data.skipped() == [
        {
            "path": str(bad),
            "split": "test",
            "reason": data.skipped()[0]["reason"],
            "stream": "images",
        }
    ]
    test = data.datasets("test")["images"]
    assert len(test) == 3 and [test[j]["id"] for j in range(3)] == [0, 2, 3]
    # unchanged files are not read again (another process, a later run)
    with monkeypatch.context() as patch:
        patch.setattr(MTANDense, "check", lambda *a, **k: pytest.fail("arrays read again"))
        again = _prepare_dense(nyu, cache, "data.on_corrupt=skip")
    assert again.skipped() == data.skipped()
    # a changed file is checked again
    label = nyu / "train" / "label" / "8.npy"
    np.save(label, np.full((H, W), 40, np.float32))
    with pytest.raises(DataError, match=re.escape(str(label))):
        _prepare_dense(nyu, cache, "data.on_corrupt=skip")


# ---- Hugging Face domains --------------------------------------------------------------------


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _hf_dataset(folder: Path, uid: list[int] | None = None, images: list | None = None) -> Path:
    """train / validation / test, each the same rows: ``images`` (4 small ones by default)."""
    images = images or [
        Image.new("RGB", (6, 4), (30 * i, 9 * i, 5 + i)) for i in range(len(uid or "abcd"))
    ]
    rows = {"image": images, "label": [i % 2 for i in range(len(images))]}
    if uid is not None:
        rows["uid"] = uid
    split = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": split, "validation": split, "test": split}).save_to_disk(
        str(folder)
    )
    return folder


def _prepare_hf(cache: Path, domains: dict[str, dict], *extra: str) -> RunData:
    spec = ", ".join(
        f"{name}: {{{', '.join(f'{k}: {v}' for k, v in kw.items())}}}"
        for name, kw in domains.items()
    )
    cfg = load_config(
        "mini-decathlon",
        [
            "data.source=hf",
            "classification.domains=[]",
            "classification.finetune_from=null",  # the preset's: a domain this source lacks
            "classification.init_from_teacher=null",
            "classification.no_flip=[]",
            f"classification.hf_domains={{{spec}}}",
            f"data.cache_dir={cache}",
            *extra,
        ],
    )
    data = build_run_data(cfg)
    data.prepare()
    return data


def test_hf_duplicate_ids(tmp_path: Path) -> None:
    path = _hf_dataset(tmp_path / "pets", uid=[5, 6, 5, 7])
    with pytest.raises(DataError) as info:
        _prepare_hf(tmp_path / "cache", {"pets": {"path": path, "id_column": "uid"}})
    message = str(info.value)
    assert str(path) in message and "image id 5 twice" in message


def test_hf_ids_are_global(tmp_path: Path) -> None:
    a = _hf_dataset(tmp_path / "a")
    b = _hf_dataset(tmp_path / "b")
    data = _prepare_hf(tmp_path / "cache", {"ants": {"path": a}, "bees": {"path": b}})
    ids = {
        (d, split): list(ds.image_ids)
        for split in ("train", "val", "test")
        for d, ds in data.datasets(split).items()
    }
    every = [i for v in ids.values() for i in v]
    assert len(every) == len(set(every))  # unique over domains and splits
    assert min(every) >= ID_DOMAIN_STRIDE > 2 * 10**8  # never a Visual Decathlon id
    assert ids["ants", "test"] == [global_id_offset("ants", "test") + r for r in range(4)]
    assert max(every) < 2**53  # exact in float64 and in any JSON reader


def test_hf_id_column_shared_with_another_domain(tmp_path: Path) -> None:
    a = _hf_dataset(tmp_path / "a", uid=[1, 2, 3])
    b = _hf_dataset(tmp_path / "b", uid=[3, 4, 5])
    with pytest.raises(DataError) as info:
        _prepare_hf(
            tmp_path / "cache",
            {"ants": {"path": a, "id_column": "uid"}, "bees": {"path": b, "id_column": "uid"}},
        )
    message = str(info.value)
    assert "image id 3" in message and str(a) in message and str(b) in message


def test_hf_missing_split(tmp_path: Path) -> None:
    path = tmp_path / "pets"
    rows = {"image": [Image.new("RGB", (4, 4))] * 2, "label": [0, 1]}
    train = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": train, "validation": train}).save_to_disk(str(path))
    with pytest.raises(DataError, match=rf"'test'.*{re.escape(str(path))}"):
        _prepare_hf(tmp_path / "cache", {"pets": {"path": path}})


def test_hf_missing_image_file(tmp_path: Path) -> None:
    # an imagefolder tree is read by path (save_to_disk would embed the bytes)
    files = []
    for i, name in enumerate(["cat", "dog", "cat"]):
        (tmp_path / "pets" / "train" / name).mkdir(parents=True, exist_ok=True)
        files.append(tmp_path / "pets" / "train" / name / f"{i}.png")
        Image.new("RGB", (5, 5), (i, 2, 3)).save(files[-1])
    raw = HFDomain(str(tmp_path / "pets"), "train", cache_dir=tmp_path / "hf")
    raw.check()
    files[1].unlink()  # e.g. a Hub dataset's cached file removed after download
    with pytest.raises(DataRootError, match=re.escape(str(files[1]))):
        raw.check()


def test_hf_skip_lists_the_row(tmp_path: Path) -> None:
    good = [Image.new("RGB", (6, 4), (9 * i, 3 * i, 7 * i)) for i in range(3)]
    path = _hf_dataset(tmp_path / "pets", images=[{"bytes": b"broken", "path": None}, *good])
    data = _prepare_hf(tmp_path / "cache", {"pets": {"path": path}}, "data.on_corrupt=skip")
    skipped = data.skipped()
    assert {e["split"] for e in skipped} == {"train", "val", "test"}
    assert all("row 0" in e["path"] and str(path) in e["path"] for e in skipped)
    assert len(data.datasets("test")["pets"]) == 3
