"""Hugging Face ``datasets`` domains: save_to_disk folders, imagefolder trees, parquet, errors."""

from __future__ import annotations

import pickle
from io import BytesIO
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from unirep.data.classification.decathlon import CorruptImageError, DataRootError
from unirep.data.classification.hf import HFDomain

CLASSES = ["cat", "dog", "fox"]
SAMPLE_KEYS = {"image", "label", "image_id", "id", "aug"}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network; ``datasets`` read the environment at import, so set both."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _image(i: int, mode: str = "L") -> Image.Image:
    """A small image whose pixels encode ``i`` (grey or RGBA, to check the RGB conversion)."""
    pixels = np.full((6, 8), 10 * i, dtype=np.uint8)
    image = Image.fromarray(pixels, mode="L")
    return image if mode == "L" else image.convert(mode)


def _classlabel_dataset(n: int = 12, offset: int = 0) -> datasets.Dataset:
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=CLASSES),
            "uid": datasets.Value("int64"),
        }
    )
    rows = {
        "image": [_image(offset + i, "L" if i % 2 else "RGBA") for i in range(n)],
        "label": [i % len(CLASSES) for i in range(n)],
        "uid": [1000 + offset + i for i in range(n)],
    }
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "single"
    _classlabel_dataset().save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def saved_dict(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "dict"
    splits = {"train": _classlabel_dataset(12), "test": _classlabel_dataset(5, offset=12)}
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def test_save_to_disk_dataset(saved_dataset: Path) -> None:
    domain = HFDomain(str(saved_dataset), "train")
    assert len(domain) == 12
    assert domain.num_classes == 3
    assert domain.class_names == CLASSES
    assert domain.labels == [i % 3 for i in range(12)]
    assert domain.image_ids == list(range(12))
    assert domain.labelled
    assert [domain.category_id(label) for label in range(3)] == [1, 2, 3]
    with pytest.raises(IndexError):
        domain.category_id(3)

    sample = domain[5]
    assert set(sample) == SAMPLE_KEYS
    assert sample["label"] == 2 and sample["image_id"] == sample["id"] == 5
    image = sample["image"]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (8, 6)
    assert image.getpixel((0, 0)) == (50, 50, 50)
    assert domain[4]["image"].mode == "RGB"  # an RGBA source image
    assert domain[-1]["image_id"] == 11
    # Rows stay in the memory-mapped Arrow file; nothing is decoded up front.
    assert isinstance(domain.hf_dataset.data, datasets.table.MemoryMappedTable)
    with pytest.raises(IndexError):
        domain[12]


def test_split_less_dataset_has_only_train(saved_dataset: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown split 'test'.*available splits: train"):
        HFDomain(str(saved_dataset), "test")


def test_save_to_disk_dataset_dict(saved_dict: Path) -> None:
    test = HFDomain(str(saved_dict), "test", id_column="uid")
    assert len(test) == 5
    assert test.image_ids == [1012, 1013, 1014, 1015, 1016]
    assert test[0]["id"] == test[0]["image_id"] == 1012
    assert test.labels == [0, 1, 2, 0, 1]
    assert test[0]["image"].getpixel((0, 0)) == (120, 120, 120)
    assert len(HFDomain(str(saved_dict), "train")) == 12
    with pytest.raises(ValueError, match=r"unknown split 'val'.*available splits: test, train"):
        HFDomain(str(saved_dict), "val")


def test_config_name_rejected_for_saved_folder(saved_dict: Path) -> None:
    with pytest.raises(ValueError, match="config_name"):
        HFDomain(str(saved_dict), "train", config_name="default")


def test_transform_is_applied(saved_dataset: Path) -> None:
    def to_tensor(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255

    sample = HFDomain(str(saved_dataset), "train", transform=to_tensor)[3]
    assert set(sample) == SAMPLE_KEYS
    assert sample["image"].shape == (3, 6, 8)
    assert torch.allclose(sample["image"], torch.full((3, 6, 8), 30 / 255))


def test_dataloader_batches_and_pickling(saved_dataset: Path) -> None:
    domain = HFDomain(str(saved_dataset), "train", transform=lambda im: torch.zeros(3, 2, 2))
    batch = next(iter(torch.utils.data.DataLoader(domain, batch_size=4)))
    assert batch["image"].shape == (4, 3, 2, 2)
    assert batch["label"].tolist() == [0, 1, 2, 0]
    assert batch["id"].tolist() == batch["image_id"].tolist() == [0, 1, 2, 3]
    # DataLoader workers receive a pickled copy.
    plain = HFDomain(str(saved_dataset), "train")
    copy = pickle.loads(pickle.dumps(plain))
    assert copy.labels == plain.labels
    assert copy[7]["image"].tobytes() == plain[7]["image"].tobytes()


def test_imagefolder_tree(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for split, count in (("train", 3), ("test", 2)):
        for name in ("dog", "cat"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                _image(i, "RGB").save(folder / f"{i}.png")
    domain = HFDomain(str(root), "train", cache_dir=tmp_path / "cache")
    assert domain.class_names == ["cat", "dog"]
    assert len(domain) == 6 and sorted(domain.labels) == [0, 0, 0, 1, 1, 1]
    assert domain[0]["image"].mode == "RGB"
    assert len(HFDomain(str(root), "test", cache_dir=tmp_path / "cache")) == 4
    with pytest.raises(ValueError, match="available splits: test, train"):
        HFDomain(str(root), "validation", cache_dir=tmp_path / "cache")


def test_string_labels_without_classlabel(tmp_path: Path) -> None:
    def split(names: list[str | None]) -> datasets.Dataset:
        rows = {"image": [_image(i) for i in range(len(names))], "species": names}
        return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())

    path = tmp_path / "strings"
    splits = {"train": split(["owl", "bee", "owl", None]), "test": split(["ant", "bee"])}
    datasets.DatasetDict(splits).save_to_disk(str(path))
    train = HFDomain(str(path), "train", label_column="species")
    # Classes come from every split, so train and test agree on the labels.
    assert train.class_names == ["ant", "bee", "owl"]
    assert train.labels == [2, 1, 2, -1]
    assert train.labelled
    test = HFDomain(str(path), "test", label_column="species")
    assert test.class_names == train.class_names and test.labels == [0, 1]


def test_integer_labels_and_unlabelled_split(tmp_path: Path) -> None:
    rows = {"image": [_image(i) for i in range(4)], "label": [7, 3, 7, 3], "blank": [-1] * 4}
    path = tmp_path / "ints"
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(str(path))
    domain = HFDomain(str(path), "train")
    assert domain.class_names == ["3", "7"] and domain.labels == [1, 0, 1, 0]
    unlabelled = HFDomain(str(path), "train", label_column="blank")
    assert not unlabelled.labelled and unlabelled.labels == [-1] * 4
    assert set(unlabelled[0]) == SAMPLE_KEYS


def test_parquet_folder_and_file(tmp_path: Path) -> None:
    folder = tmp_path / "pq"
    folder.mkdir()
    _classlabel_dataset(6).to_parquet(str(folder / "test.parquet"))
    domain = HFDomain(str(folder), "test", cache_dir=tmp_path / "cache")
    assert domain.class_names == CLASSES and len(domain) == 6
    assert domain[2]["image"].getpixel((0, 0)) == (20, 20, 20)
    single = HFDomain(str(folder / "test.parquet"), "train", cache_dir=tmp_path / "cache")
    assert single.labels == domain.labels


def test_missing_local_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataRootError, match="nowhere"):
        HFDomain(str(missing), "train")
    with pytest.raises(DataRootError, match=r"\./nowhere"):
        HFDomain("./nowhere", "train")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataRootError, match="no dataset could be read"):
        HFDomain(str(tmp_path), "train", cache_dir=tmp_path / "cache")


def test_hub_name_offline(tmp_path: Path) -> None:
    with pytest.raises(DataRootError) as info:
        HFDomain("some-user/no-such-set", "train", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "offline" in message and "some-user/no-such-set" in message


def test_offline_switched_on_after_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # datasets itself would still go online here; the domain must refuse before trying.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(DataRootError, match=r"'some-user/no-such-set'.*offline mode is on"):
        HFDomain("some-user/no-such-set", "train", cache_dir=tmp_path / "cache")


def test_missing_columns(saved_dataset: Path) -> None:
    with pytest.raises(ValueError, match=r"image column 'img'.*available columns: image, label"):
        HFDomain(str(saved_dataset), "train", image_column="img")
    with pytest.raises(ValueError, match=r"label column 'target'.*image, label, uid"):
        HFDomain(str(saved_dataset), "train", label_column="target")
    with pytest.raises(ValueError, match=r"id column 'id'"):
        HFDomain(str(saved_dataset), "train", id_column="id")


def test_wrong_column_kinds(saved_dataset: Path) -> None:
    with pytest.raises(ValueError, match=r"image column 'uid'.*datasets.Image"):
        HFDomain(str(saved_dataset), "train", image_column="uid")
    with pytest.raises(ValueError, match=r"id column 'label'.*integers"):
        HFDomain(str(saved_dataset), "train", id_column="label")


def test_corrupt_image_names_the_row(tmp_path: Path) -> None:
    images = [{"bytes": _png(0), "path": None}, {"bytes": b"not an image", "path": None}]
    rows = {"image": images, "label": [0, 1]}
    path = tmp_path / "corrupt"
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(str(path))
    domain = HFDomain(str(path), "train")  # nothing is decoded until indexed
    assert domain[0]["image"].mode == "RGB"
    with pytest.raises(CorruptImageError, match=r"row 1 of split 'train' of dataset .*corrupt"):
        domain[1]


def _png(i: int) -> bytes:
    buffer = BytesIO()
    _image(i).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_batch_transformed_at_once_equals_the_samples_one_by_one(saved_dataset: Path) -> None:
    """The DataLoader's batched fetch (``__getitems__``) gives the samples of one by one."""
    from unirep.data.classification.transforms import build_transform

    transform = build_transform(True, resize=12, crop=8, mean=[0.5] * 3, std=[0.25] * 3)
    domain = HFDomain(str(saved_dataset), "train", transform=transform)
    indices = [0, 5, 2, 5, -1]
    torch.manual_seed(3)
    one_by_one = [domain[i] for i in indices]
    torch.manual_seed(3)
    batched = domain.__getitems__(indices)
    for a, b in zip(one_by_one, batched, strict=True):
        assert torch.equal(a["image"], b["image"]) and a["label"] == b["label"]
        assert a["id"] == b["id"] and torch.equal(a["aug"]["crop"], b["aug"]["crop"])
        assert bool(a["aug"]["flip"]) == bool(b["aug"]["flip"])
    with pytest.raises(IndexError):
        domain.__getitems__([0, len(domain)])
