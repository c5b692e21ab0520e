"""Classification data layer: Decathlon reader, synthetic mini-decathlon, transforms, statistics."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unirep.data.classification import mini_decathlon as synthetic
from unirep.data.classification import stats
from unirep.data.classification.decathlon import (
    DECATHLON_DOMAINS,
    CorruptImageError,
    DataRootError,
    DecathlonDomain,
)
from unirep.data.classification.mini_decathlon import (
    MINI_DECATHLON_DOMAINS,
    ensure_mini_decathlon,
    generate_mini_decathlon,
)
from unirep.data.classification.stats import domain_mean_std
from unirep.data.classification.transforms import build_transform

SCALE = 0.03  # a few images per class: enough to check the format, fast to write
IMAGE_SIZE = 32
STRIDE = 10_000_000


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mini") / "decathlon"
    generate_mini_decathlon(root, seed=0, image_size=IMAGE_SIZE, scale=SCALE)
    return root


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _write_fixture(
    root: Path,
    domain: str,
    split: str,
    images: list[tuple[int, int | None]],
    category_ids: list[int],
    stripped: bool = False,
) -> None:
    """A hand-written Decathlon-format split: (image_id, category_id) pairs, 8×12 JPEGs."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "data" / domain / split).mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for i, (image_id, category_id) in enumerate(images, start=1):
        file_name = f"data/{domain}/{split}/{i:06d}.jpg"
        Image.new("RGB", (12, 8), (10 * i, 0, 0)).save(root / file_name, quality=90)
        entries.append({"id": image_id, "width": 12, "height": 8, "file_name": file_name})
        annotations.append({"id": image_id, "image_id": image_id, "category_id": category_id})
    content: dict = {
        "images": entries,
        "categories": [
            {"id": c, "name": f"class{c}", "supercategory": domain} for c in category_ids
        ],
    }
    if not stripped:
        content["annotations"] = annotations
    name = f"{domain}_test_stripped" if stripped else f"{domain}_{split}"
    (root / "annotations" / f"{name}.json").write_text(json.dumps(content), encoding="utf-8")


# ----------------------------------------------------------------------------- synthetic data


def test_mini_decathlon_has_official_format(mini_root: Path) -> None:
    official_keys = {"info", "images", "annotations", "categories", "licenses"}
    for d, spec in enumerate(MINI_DECATHLON_DOMAINS, start=1):
        expected_cats = [d * STRIDE + c for c in range(1, spec.num_classes + 1)]
        next_image_id = d * STRIDE + 200_000 + 1
        for split in ("train", "val", "test"):
            content = _load(mini_root / "annotations" / f"{spec.name}_{split}.json")
            assert set(content) == official_keys
            assert {"year", "version", "description", "contributor", "url", "date_created"} <= set(
                content["info"]
            )
            assert [c["id"] for c in content["categories"]] == expected_cats
            assert all(c["supercategory"] == spec.name for c in content["categories"])
            assert content["licenses"] == [{"id": 1, "name": "decathlon"}]
            for k, image in enumerate(content["images"], start=1):
                assert set(image) == {"id", "width", "height", "file_name"}
                assert image["id"] == next_image_id
                next_image_id += 1
                assert image["file_name"] == f"data/{spec.name}/{split}/{k:06d}.jpg"
                assert min(image["width"], image["height"]) == IMAGE_SIZE
            for image, ann in zip(content["images"], content["annotations"], strict=True):
                assert ann == {
                    "id": image["id"],
                    "image_id": image["id"],
                    "category_id": ann["category_id"],
                    "segmentation": [],
                    "area": 0,
                    "bbox": [],
                    "iscrowd": 0,
                }
                assert ann["category_id"] in expected_cats
            # spot-check that the JPEGs on disk have the recorded size
            first = content["images"][0]
            with Image.open(mini_root / first["file_name"]) as img:
                assert img.format == "JPEG"
                assert img.size == (first["width"], first["height"])
            assert len(list((mini_root / "data" / spec.name / split).iterdir())) == len(
                content["images"]
            )
        stripped = _load(mini_root / "annotations" / f"{spec.name}_test_stripped.json")
        assert "annotations" not in stripped
        labelled = _load(mini_root / "annotations" / f"{spec.name}_test.json")
        assert stripped["images"] == labelled["images"]
        assert stripped["categories"] == labelled["categories"]


def test_mini_decathlon_domains_differ() -> None:
    names = [spec.name for spec in MINI_DECATHLON_DOMAINS]
    assert names == sorted(names) and len(names) >= 5
    shapes = {spec.image_shape(IMAGE_SIZE) for spec in MINI_DECATHLON_DOMAINS}
    assert any(h > w for h, w in shapes) and any(w > h for h, w in shapes)
    assert (IMAGE_SIZE, IMAGE_SIZE) in shapes
    largest = max(MINI_DECATHLON_DOMAINS, key=lambda s: s.sizes[0])
    for spec in MINI_DECATHLON_DOMAINS:
        if spec is not largest:
            assert 5 <= spec.num_classes < largest.num_classes
            assert 3 * spec.sizes[0] <= largest.sizes[0]


def test_generation_is_deterministic(tmp_path: Path, mini_root: Path) -> None:
    again = tmp_path / "again"
    generate_mini_decathlon(again, seed=0, image_size=IMAGE_SIZE, scale=SCALE)
    assert _tree_digest(again) == _tree_digest(mini_root)
    other = tmp_path / "other"
    generate_mini_decathlon(other, seed=1, image_size=IMAGE_SIZE, scale=SCALE)
    digest, other_digest = _tree_digest(mini_root), _tree_digest(other)
    images = [k for k in digest if k.endswith(".jpg")]
    assert any(digest[k] != other_digest[k] for k in images)


def test_ensure_generates_only_when_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "mini"
    assert ensure_mini_decathlon(root, seed=3, scale=0.01) == root
    assert (root / ".complete").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini"]  # no temp folders left

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated although the tree is complete")

    monkeypatch.setattr(synthetic, "generate_mini_decathlon", fail)
    ensure_mini_decathlon(root, seed=3, scale=0.01)
    monkeypatch.undo()

    ensure_mini_decathlon(root, seed=4, scale=0.01)  # other parameters: regenerated in place
    assert json.loads((root / ".complete").read_text())["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini"]


def test_generation_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        generate_mini_decathlon(tmp_path / "mine", scale=0.01)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- reader


def test_reader_labels_ids_and_classes(mini_root: Path) -> None:
    for d, spec in enumerate(MINI_DECATHLON_DOMAINS, start=1):
        content = _load(mini_root / "annotations" / f"{spec.name}_train.json")
        ds = DecathlonDomain(mini_root, spec.name, "train")
        assert ds.labelled and ds.num_classes == spec.num_classes
        assert ds.class_names == list(spec.class_names)
        assert len(ds) == len(content["images"])
        assert ds.image_ids == sorted(ds.image_ids)
        truth = {a["image_id"]: a["category_id"] for a in content["annotations"]}
        for image_id, label in zip(ds.image_ids, ds.labels, strict=True):
            assert truth[image_id] == d * STRIDE + label + 1  # official encoding
            assert ds.category_id(label) == truth[image_id]
        sample = ds[0]
        assert set(sample) == {"image", "label", "image_id", "id", "aug"}
        assert sample["image"].mode == "RGB"  # also for the grayscale glyph domain
        assert min(sample["image"].size) == IMAGE_SIZE
        assert (sample["label"], sample["image_id"]) == (ds.labels[0], ds.image_ids[0])


def test_reader_any_category_encoding_and_order(tmp_path: Path) -> None:
    _write_fixture(tmp_path, "mine", "train", [(30, 9), (10, 5), (20, 7), (40, 5)], [9, 5, 7])
    ds = DecathlonDomain(tmp_path, "mine", "train")
    assert ds.image_ids == [10, 20, 30, 40]
    assert ds.labels == [0, 1, 2, 0]
    assert ds.class_names == ["class5", "class7", "class9"]
    assert [ds.category_id(label) for label in range(3)] == [5, 7, 9]
    with pytest.raises(IndexError):
        ds.category_id(3)


def test_test_split_prefers_labelled_then_stripped(mini_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(mini_root, root)
    labelled = DecathlonDomain(root, "toys", "test")
    assert labelled.labelled and min(labelled.labels) >= 0
    (root / "annotations" / "toys_test.json").unlink()
    stripped = DecathlonDomain(root, "toys", "test")
    assert not stripped.labelled
    assert set(stripped.labels) == {-1} and stripped[0]["label"] == -1
    assert stripped.image_ids == labelled.image_ids
    assert stripped.num_classes == labelled.num_classes


def test_missing_paths_raise_data_root_error(tmp_path: Path) -> None:
    with pytest.raises(DataRootError, match=re.escape(str(tmp_path / "nowhere"))):
        DecathlonDomain(tmp_path / "nowhere", "aircraft", "train")
    _write_fixture(tmp_path, "mine", "train", [(1, 1), (2, 2)], [1, 2])
    expected = tmp_path / "annotations" / "mine_val.json"
    with pytest.raises(DataRootError, match=re.escape(str(expected))) as err:
        DecathlonDomain(tmp_path, "mine", "val")
    assert "data/mine/val/NNNNNN.jpg" in str(err.value)
    with pytest.raises(DataRootError, match=r"mine_test\.json"):
        DecathlonDomain(tmp_path, "mine", "test")
    missing = tmp_path / "data" / "mine" / "train" / "000002.jpg"
    missing.unlink()
    ds = DecathlonDomain(tmp_path, "mine", "train")
    assert ds[0]["image_id"] == 1
    with pytest.raises(DataRootError, match=re.escape(str(missing))):
        ds[1]
    shutil.rmtree(tmp_path / "data")
    with pytest.raises(DataRootError, match="data/mine/train"):
        DecathlonDomain(tmp_path, "mine", "train")


def test_bad_arguments_name_the_choices(tmp_path: Path) -> None:
    _write_fixture(tmp_path, "mine", "train", [(1, 1)], [1])
    with pytest.raises(ValueError, match="train, val, test"):
        DecathlonDomain(tmp_path, "mine", "training")
    with pytest.raises(ValueError, match="error, skip"):
        DecathlonDomain(tmp_path, "mine", "train", on_corrupt="ignore")


def test_corrupt_image_error_or_skip(tmp_path: Path) -> None:
    _write_fixture(tmp_path, "mine", "train", [(1, 1), (2, 2), (3, 1)], [1, 2])
    bad = tmp_path / "data" / "mine" / "train" / "000002.jpg"
    bad.write_bytes(b"this is not a jpeg" * 10)
    ds = DecathlonDomain(tmp_path, "mine", "train")
    assert len(ds) == 3
    with pytest.raises(CorruptImageError, match=re.escape(str(bad))):
        ds[1]
    skipping = DecathlonDomain(tmp_path, "mine", "train", on_corrupt="skip")
    assert [e["path"] for e in skipping.skipped] == [str(bad)]
    assert "cannot identify image" in skipping.skipped[0]["reason"]
    assert skipping.image_ids == [1, 3] and skipping.labels == [0, 0]
    assert [skipping[i]["image_id"] for i in range(len(skipping))] == [1, 3]


def test_truncated_jpeg_is_corrupt(tmp_path: Path) -> None:
    _write_fixture(tmp_path, "mine", "train", [(1, 1)], [1])
    path = tmp_path / "data" / "mine" / "train" / "000001.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(CorruptImageError, match=r"000001\.jpg"):
        DecathlonDomain(tmp_path, "mine", "train")[0]


# ----------------------------------------------------------------------------- transforms


def _half_white(width: int = 40, height: int = 32) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("square_resize", [True, False])
def test_transform_shapes(train: bool, square_resize: bool) -> None:
    tf = build_transform(train, 36, 32, [0.5] * 3, [0.25] * 3, square_resize=square_resize)
    out = tf(_half_white(48, 32))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_transform_normalises() -> None:
    tf = build_transform(False, 8, 8, [0.2, 0.4, 0.6], [0.5, 0.5, 0.5])
    out = tf(Image.new("RGB", (8, 8), (51, 102, 153)))  # 0.2, 0.4, 0.6
    assert torch.allclose(out, torch.zeros_like(out), atol=1e-6)


def test_transform_flips_only_when_enabled() -> None:
    torch.manual_seed(0)
    image = _half_white(32, 32)

    def left_is_bright(tf) -> list[bool]:
        return [bool(tf(image)[0, :, 0].mean() > 0) for _ in range(40)]

    flipping = left_is_bright(build_transform(True, 32, 32, [0.5] * 3, [0.5] * 3, flip=True))
    assert set(flipping) == {True, False}
    for tf in (
        build_transform(True, 32, 32, [0.5] * 3, [0.5] * 3, flip=False),
        build_transform(False, 32, 32, [0.5] * 3, [0.5] * 3, flip=True),
    ):
        assert set(left_is_bright(tf)) == {True}


def test_transform_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="crop"):
        build_transform(True, 32, 36, [0.5] * 3, [0.5] * 3)


# ----------------------------------------------------------------------------- statistics


def test_official_domains_use_reference_figures(tmp_path: Path) -> None:
    reference = json.loads(
        (Path(stats.__file__).parent / "decathlon_mean_std.json").read_text(encoding="utf-8")
    )
    assert set(DECATHLON_DOMAINS) <= set(reference)
    for domain in DECATHLON_DOMAINS:
        mean, std = domain_mean_std(tmp_path / "absent", domain, tmp_path)
        assert (mean, std) == (reference[domain]["mean"], reference[domain]["std"])
    assert domain_mean_std(tmp_path, "imagenet12", tmp_path) == (
        [0.485, 0.456, 0.406],
        [0.229, 0.224, 0.225],
    )
    assert not (tmp_path / "stats").exists()


def test_custom_domain_statistics_are_computed_and_cached(
    mini_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mean, std = domain_mean_std(mini_root, "glyphs", tmp_path, max_images=50)
    ds = DecathlonDomain(mini_root, "glyphs", "train")
    count = min(len(ds), 50)
    pixels = np.concatenate(
        [np.asarray(ds[i]["image"], np.float64).reshape(-1, 3) / 255 for i in range(count)]
    )
    assert np.allclose(mean, pixels.mean(axis=0)) and np.allclose(std, pixels.std(axis=0))
    cached = list((tmp_path / "stats").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".json"

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(stats, "_compute", fail)
    assert domain_mean_std(mini_root, "glyphs", tmp_path, max_images=50) == (mean, std)
    monkeypatch.undo()

    # keyed by the files' fingerprint, not the path: a copy with the same files reuses the entry
    other_root = tmp_path / "elsewhere"
    shutil.copytree(mini_root, other_root)  # copy2 keeps sizes and mtimes
    monkeypatch.setattr(stats, "_compute", fail)
    assert domain_mean_std(other_root, "glyphs", tmp_path, max_images=50) == (mean, std)
    monkeypatch.undo()
    assert len(list((tmp_path / "stats").iterdir())) == 1


def test_malformed_annotation_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    bad = tmp_path / "annotations" / "digits_train.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"digits_train\.json"):
        DecathlonDomain(tmp_path, "digits", "train")
    bad.write_text('{"images": []}')
    with pytest.raises(ValueError, match="categories"):
        DecathlonDomain(tmp_path, "digits", "train")
