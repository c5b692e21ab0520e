"""Every dataset sample carries a stable ``"id"`` and the ``"aug"`` it was drawn with.

Contract (issue #8): classification samples (mini-decathlon, Decathlon tree, Hugging Face) carry
``"id"`` = ``"image_id"`` and ``"aug"`` = ``{"crop": int64 [4], "flip": bool ()}``; MTAN dense
samples carry ``"id"`` = ``"index"`` (the file index in the folder, also for a validation split
carved from train) and ``"aug"`` = ``{"scale": float32 (), "crop": int64 [4], "flip": bool ()}``.
The recorded parameters reproduce the augmented sample, and the random draws are those of the
plain torchvision v2 pipeline / MTAN augmentation, so training is bit-identical to before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from tests.decathlon_fixture import write_official_fixture
from unirep.config.schema import ClassificationConfig, DataConfig, HFDomainConfig
from unirep.data.classification.decathlon import DecathlonDomain
from unirep.data.classification.hf import HFDomain, global_id_offset
from unirep.data.classification.sources import DomainSet, build_domains
from unirep.data.classification.transforms import (
    DECATHLON_NO_FLIP,
    DECATHLON_SQUARE_RESIZE,
    apply_transform,
    build_transform,
)
from unirep.data.dense.mtan import (
    DENSE_TASKS,
    MTANDense,
    ScaleCrop,
    apply_scale_crop,
    hflip,
    replay_augmentation,
    sample_scale_crop,
    write_mtan_fixture,
)
from unirep.data.dense.sources import DenseData

MEAN = [0.4, 0.5, 0.6]
STD = [0.2, 0.25, 0.3]
CLASSIFICATION_KEYS = {"image", "label", "image_id", "id", "aug"}
DENSE_KEYS = {"image", "semantic", "depth", "normal", "index", "id", "aug"}
MAPS = ("image", "semantic", "depth", "normal")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


# ---- helpers -------------------------------------------------------------------------------


def _reference_v2(
    train: bool, resize: int, crop: int, flip: bool = True, square_resize: bool = False
) -> v2.Compose:
    """The classification pipeline as it was before the contract (the draws to reproduce)."""
    size: int | list[int] = [resize, resize] if square_resize else resize
    steps: list[Callable] = [v2.ToImage(), v2.Resize(size, antialias=True)]
    if train:
        steps.append(v2.RandomCrop(crop))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps.append(v2.CenterCrop(crop))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=MEAN, std=STD)]
    return v2.Compose(steps)


def _legacy_dense_augment(
    sample: dict[str, Any],
    scales: tuple[float, ...],
    flip: bool,
    depth_kind: str,
    generator: torch.Generator | None,
) -> dict[str, Any]:
    """MTANDense's augmentation as it was before the contract (the draws to reproduce)."""
    height, width = sample["image"].shape[-2:]
    crop = sample_scale_crop(height, width, scales, generator)
    if crop.scale != 1.0:
        sample = apply_scale_crop(sample, crop, depth_kind)
    if flip and float(torch.rand((), generator=generator)) < 0.5:
        sample = hflip(sample)
    return sample


def _random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _check_classification_sample(sample: dict[str, Any], crop: int) -> None:
    assert CLASSIFICATION_KEYS <= set(sample)
    assert isinstance(sample["id"], int) and sample["id"] == sample["image_id"]
    aug = sample["aug"]
    assert set(aug) == {"crop", "flip"}
    assert aug["crop"].dtype == torch.int64 and aug["crop"].shape == (4,)
    assert aug["flip"].dtype == torch.bool and aug["flip"].shape == ()
    assert aug["crop"][2:].tolist() == [crop, crop]
    assert sample["image"].shape == (3, crop, crop)


def _check_dense_sample(sample: dict[str, Any], height: int, width: int) -> None:
    assert set(sample) == DENSE_KEYS
    assert isinstance(sample["id"], int) and sample["id"] == sample["index"]
    aug = sample["aug"]
    assert set(aug) == {"scale", "crop", "flip"}
    assert aug["scale"].dtype == torch.float32 and aug["scale"].shape == ()
    assert aug["crop"].dtype == torch.int64 and aug["crop"].shape == (4,)
    assert aug["flip"].dtype == torch.bool and aug["flip"].shape == ()
    top, left, h, w = aug["crop"].tolist()
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    if float(aug["scale"]) == 1.0:
        assert aug["crop"].tolist() == [0, 0, height, width]


def _rebuild_classification(
    raw: Image.Image,
    aug: dict[str, Any],
    resize: int,
    square: bool,
    mean: list[float] = MEAN,
    std: list[float] = STD,
) -> torch.Tensor:
    """Resize → crop with the recorded box → flip if recorded → scale and normalise."""
    size: int | list[int] = [resize, resize] if square else resize
    x = TF.resize(TF.to_image(raw), size, antialias=True)
    top, left, height, width = aug["crop"].tolist()
    x = TF.crop(x, top, left, height, width)
    if bool(aug["flip"]):
        x = TF.horizontal_flip(x)
    return TF.normalize(TF.to_dtype(x, torch.float32, scale=True), mean=mean, std=std)


def _ids_over_epochs(dataset: Dataset, epochs: int = 2, **loader: Any) -> list[dict[int, int]]:
    """{id: label or index} per epoch, read through a shuffling DataLoader."""
    out = []
    for epoch in range(epochs):
        torch.manual_seed(epoch)
        seen: dict[int, int] = {}
        for batch in DataLoader(dataset, batch_size=3, shuffle=True, **loader):
            key = "label" if "label" in batch else "index"
            for i, value in zip(batch["id"].tolist(), batch[key].tolist(), strict=True):
                assert i not in seen
                seen[i] = value
        out.append(seen)
    return out


# ---- transform: bit-identical to the v2 pipeline ---------------------------------------------


@pytest.mark.parametrize(
    ("train", "flip", "square_resize"),
    [(True, True, False), (True, False, False), (True, True, True), (False, True, False),
     (False, True, True)],
)  # fmt: skip
@pytest.mark.parametrize(
    ("resize", "crop"),
    [(36, 32), (32, 32), (72, 64), (24, 17)],
    ids=["36-32", "32-32", "72-64", "24-17"],
)
def test_transform_matches_v2_pipeline(
    train: bool, flip: bool, square_resize: bool, resize: int, crop: int
) -> None:
    """Same output tensor, same parameters and same RNG use as the plain v2 Compose."""
    ours = build_transform(train, resize, crop, MEAN, STD, flip=flip, square_resize=square_resize)
    reference = _reference_v2(train, resize, crop, flip=flip, square_resize=square_resize)
    sizes = [(32, 32), (40, 32), (32, 48), (17, 29), (72, 96), (101, 60)]
    flips = set()
    for seed in range(60):
        height, width = sizes[seed % len(sizes)]
        image = _random_image(height, width, seed)
        if seed % 3 == 0:
            image = TF.pil_to_tensor(image)  # uint8 tensors are accepted too
        torch.manual_seed(seed)
        expected = reference(image)
        after_reference = torch.rand(4)
        torch.manual_seed(seed)
        out, aug = ours.with_params(image)
        assert torch.equal(torch.rand(4), after_reference), "different number of draws"
        assert type(out) is type(expected)
        assert out.dtype == torch.float32 and out.shape == (3, crop, crop)
        assert torch.equal(out, expected), (seed, height, width)
        torch.manual_seed(seed)
        assert torch.equal(ours(image), expected)  # the plain call returns just the tensor
        assert aug["crop"].dtype == torch.int64 and aug["crop"].shape == (4,)
        assert aug["flip"].dtype == torch.bool and aug["flip"].shape == ()
        assert torch.equal(ours.replay(image, aug), expected)
        flips.add(bool(aug["flip"]))
        if not train:
            resized = ours.resized(image).shape[-2:]
            top, left, _, _ = aug["crop"].tolist()
            assert (top, left) == (round((resized[0] - crop) / 2), round((resized[1] - crop) / 2))
    assert flips == ({True, False} if train and flip else {False})


def test_transform_sequence_matches_v2_pipeline() -> None:
    """One seed, many images in a row: the RNG streams stay in step (as in an epoch)."""
    ours = build_transform(True, 36, 32, MEAN, STD)
    reference = _reference_v2(True, 36, 32)
    images = [_random_image(30 + i % 7, 33 + 3 * (i % 5), i) for i in range(50)]
    torch.manual_seed(123)
    expected = [reference(im) for im in images]
    torch.manual_seed(123)
    for image, want in zip(images, expected, strict=True):
        assert torch.equal(ours(image), want)


def test_apply_transform_without_recording_transform() -> None:
    image = _random_image(10, 14, 0)
    same, aug = apply_transform(None, image)
    assert same is image and aug["crop"].tolist() == [0, 0, 10, 14] and not bool(aug["flip"])
    tensor, aug = apply_transform(TF.pil_to_tensor, image)
    assert tensor.shape == (3, 10, 14) and aug["crop"].tolist() == [0, 0, 10, 14]


# ---- classification datasets ------------------------------------------------------------------


def _check_classification_family(
    domains: DomainSet, domain: str, split: str, raw: Dataset, resize: int
) -> None:
    """Contract, stable ids, collation and reproduction of the augmented image."""
    train = domains.dataset(domain, split, train=True)
    evaluation = domains.dataset(domain, split)
    crop = domains.crop(domain)
    square = domain in domains.spec.square_resize
    mean, std = domains.mean_std(domain)
    n = len(train)
    for i in range(n):
        sample = train[i]
        _check_classification_sample(sample, crop)
        _check_classification_sample(evaluation[i], crop)
        assert train[i]["id"] == sample["id"] == evaluation[i]["id"] == raw[i]["id"]
        rebuilt = _rebuild_classification(raw[i]["image"], sample["aug"], resize, square, mean, std)
        assert torch.equal(rebuilt, sample["image"])
        rebuilt = _rebuild_classification(
            raw[i]["image"], evaluation[i]["aug"], resize, square, mean, std
        )
        assert torch.equal(rebuilt, evaluation[i]["image"])
        assert not bool(evaluation[i]["aug"]["flip"])
    # the same centre box every time at evaluation
    assert torch.equal(evaluation[0]["aug"]["crop"], evaluation[0]["aug"]["crop"])
    first, second = _ids_over_epochs(train)
    assert first == second and len(first) == n
    batch = next(iter(DataLoader(train, batch_size=min(4, n))))
    b = min(4, n)
    assert batch["image"].shape == (b, 3, crop, crop)
    assert batch["id"].dtype == torch.int64 and batch["id"].shape == (b,)
    assert torch.equal(batch["id"], batch["image_id"])
    assert batch["aug"]["crop"].dtype == torch.int64 and batch["aug"]["crop"].shape == (b, 4)
    assert batch["aug"]["flip"].dtype == torch.bool and batch["aug"]["flip"].shape == (b,)


def _configs(**values: Any) -> tuple[DataConfig, ClassificationConfig]:
    """The data and classification sections holding ``values``, each key in its own section."""
    mine = {f.name for f in dataclasses.fields(ClassificationConfig)}
    spec = ClassificationConfig(**{k: v for k, v in values.items() if k in mine})
    return DataConfig(**{k: v for k, v in values.items() if k not in mine}), spec


def test_mini_decathlon_source(tmp_path: Path) -> None:
    cfg, spec = _configs(
        generator={"seed": 0, "image_size": 32, "scale": 0.03},
        resize=32,
        crop=28,
        no_flip=["digits"],
        square_resize=["objects"],
    )
    domains = build_domains(cfg, spec, tmp_path / "cache")
    assert "digits" in domains.domains and "objects" in domains.domains
    for domain in domains.domains:
        raw = DecathlonDomain(domains.root, domain, "train")
        _check_classification_family(domains, domain, "train", raw, 32)
        train = domains.dataset(domain, "train", train=True)
        assert [train[i]["id"] for i in range(len(train))] == raw.image_ids
        if domain in spec.no_flip:
            assert not any(bool(train[i]["aug"]["flip"]) for i in range(len(train)))
    # ids are also stable across worker processes
    train = domains.dataset("digits", "train", train=True)
    in_workers = _ids_over_epochs(train, num_workers=2)
    assert in_workers == _ids_over_epochs(train)


def test_decathlon_tree_source(tmp_path: Path) -> None:
    root = write_official_fixture(tmp_path / "decathlon-1.0")
    cfg, spec = _configs(
        source="decathlon",
        root=str(root),
        domains=["aircraft", "gtsrb", "dtd"],
        resize=72,
        crop=64,
        no_flip=sorted(DECATHLON_NO_FLIP),
        square_resize=sorted(DECATHLON_SQUARE_RESIZE),
    )
    domains = build_domains(cfg, spec, tmp_path / "cache")
    for domain in domains.domains:
        for split in ("train", "val", "test"):
            raw = DecathlonDomain(root, domain, split)
            _check_classification_family(domains, domain, split, raw, 72)
            train = domains.dataset(domain, split, train=True)
            assert [train[i]["id"] for i in range(len(train))] == raw.image_ids
    gtsrb = domains.dataset("gtsrb", "train", train=True)
    assert not any(bool(gtsrb[i]["aug"]["flip"]) for i in range(len(gtsrb)))


def _hf_folder(folder: Path) -> Path:
    rng = np.random.default_rng(0)

    def split(n: int, offset: int) -> datasets.Dataset:
        images = [
            Image.fromarray(rng.integers(0, 256, (20 + i % 3, 26 - i % 4, 3), dtype=np.uint8))
            for i in range(n)
        ]
        features = datasets.Features(
            {
                "img": datasets.Image(),
                "kind": datasets.ClassLabel(names=["a", "b"]),
                "uid": datasets.Value("int64"),
            }
        )
        rows = {
            "img": images,
            "kind": [i % 2 for i in range(n)],
            "uid": [7 * i + offset for i in range(n)],
        }
        return datasets.Dataset.from_dict(rows, features=features)

    splits = {"train": split(10, 1000), "validation": split(4, 5000), "test": split(4, 9000)}
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("id_column", ["uid", None])
def test_hf_domain(tmp_path: Path, id_column: str | None) -> None:
    path = _hf_folder(tmp_path / "pets")
    spec = HFDomainConfig(
        path=str(path), image_column="img", label_column="kind", id_column=id_column
    )
    cfg, classification = _configs(source="hf", resize=20, crop=16, hf_domains={"pets": spec})
    domains: DomainSet = build_domains(cfg, classification, tmp_path / "cache")
    for split, name in spec.splits.items():
        offset = global_id_offset("pets", split) if id_column is None else 0
        raw = HFDomain(
            str(path), name, image_column="img", label_column="kind", id_column=id_column,
            id_offset=offset,
        )  # fmt: skip
        _check_classification_family(domains, "pets", split, raw, 20)
        train = domains.dataset("pets", split, train=True)
        ids = [train[i]["id"] for i in range(len(train))]
        assert ids == raw.image_ids
        if id_column is None:
            assert ids == [offset + row for row in range(len(train))]


# ---- dense ----------------------------------------------------------------------------------

H, W = 12, 16


def _plain_maps(sample: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sample.items() if k in MAPS}


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("depth_kind", ["depth", "inverse_depth"])
def test_mtan_dense_contract(tmp_path: Path, flip: bool, depth_kind: str) -> None:
    write_mtan_fixture(tmp_path, "train", n=5, height=H, width=W, classes=7)
    scales = (1.0, 1.2, 1.5)
    plain = MTANDense(tmp_path, "train", list(DENSE_TASKS), depth_kind=depth_kind)
    augmented = MTANDense(
        tmp_path, "train", list(DENSE_TASKS), depth_kind=depth_kind, augment=True, scales=scales,
        flip=flip, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    for i in range(len(plain)):
        sample = plain[i]
        _check_dense_sample(sample, H, W)
        assert sample["id"] == i
        assert float(sample["aug"]["scale"]) == 1.0 and not bool(sample["aug"]["flip"])
    seen_scales, seen_flips = set(), set()
    for _ in range(6):
        for i in range(len(plain)):
            out = augmented[i]
            _check_dense_sample(out, H, W)
            assert out["id"] == i
            aug = out["aug"]
            seen_scales.add(round(float(aug["scale"]), 3))
            seen_flips.add(bool(aug["flip"]))
            # the recorded ScaleCrop and flip, applied to the unaugmented maps, give the sample
            expected = _plain_maps(plain[i])
            scale = float(aug["scale"])
            if scale != 1.0:
                crop = ScaleCrop(scale, *aug["crop"].tolist())
                expected = apply_scale_crop(expected, crop, depth_kind)
            if bool(aug["flip"]):
                expected = hflip(expected)
            replayed = replay_augmentation(_plain_maps(plain[i]), aug, depth_kind)
            for key in MAPS:
                assert torch.equal(out[key], expected[key]), key
                assert torch.equal(out[key], replayed[key]), key
    assert seen_scales == {1.0, 1.2, 1.5}
    assert seen_flips == ({True, False} if flip else {False})

    batch = next(iter(DataLoader(augmented, batch_size=4)))
    assert batch["id"].dtype == torch.int64 and batch["id"].tolist() == [0, 1, 2, 3]
    assert torch.equal(batch["id"], batch["index"])
    assert batch["aug"]["scale"].dtype == torch.float32 and batch["aug"]["scale"].shape == (4,)
    assert batch["aug"]["crop"].dtype == torch.int64 and batch["aug"]["crop"].shape == (4, 4)
    assert batch["aug"]["flip"].dtype == torch.bool and batch["aug"]["flip"].shape == (4,)
    first, second = _ids_over_epochs(augmented)
    assert first == second == {i: i for i in range(5)}


@pytest.mark.parametrize("use_generator", [True, False])
def test_mtan_dense_draws_unchanged(tmp_path: Path, use_generator: bool) -> None:
    """The augmented maps and the generator state match MTAN's augmentation as it was."""
    write_mtan_fixture(tmp_path, "train", n=3, height=H, width=W, classes=7)
    scales = (1.0, 1.2, 1.5)
    plain = MTANDense(tmp_path, "train", list(DENSE_TASKS))
    for seed in range(8):
        g_new = torch.Generator().manual_seed(seed) if use_generator else None
        g_old = torch.Generator().manual_seed(seed) if use_generator else None
        augmented = MTANDense(
            tmp_path, "train", list(DENSE_TASKS), augment=True, scales=scales, generator=g_new
        )
        torch.manual_seed(seed)
        outs = [augmented[i % 3] for i in range(6)]
        after_new = torch.rand(3, generator=g_new)
        torch.manual_seed(seed)
        legacy = [
            _legacy_dense_augment(_plain_maps(plain[i % 3]), scales, True, "depth", g_old)
            for i in range(6)
        ]
        assert torch.equal(torch.rand(3, generator=g_old), after_new)
        for out, want in zip(outs, legacy, strict=True):
            for key in MAPS:
                assert torch.equal(out[key], want[key]), key


def test_carved_validation_split_ids(tmp_path: Path) -> None:
    write_mtan_fixture(tmp_path, "train", n=10, height=H, width=W, classes=7)
    write_mtan_fixture(tmp_path, "val", n=3, height=H, width=W, classes=7, seed=1)

    def data() -> DenseData:
        return DenseData(
            root=tmp_path, tasks=list(DENSE_TASKS), num_classes=7, class_names=None,
            label_dir="label", depth_kind="depth", scales=(1.0, 1.5), flip=True, augment=True,
            val_folder=None, val_fraction=0.3, test_folder="val", source="mtan",
        )  # fmt: skip

    dense = data()
    train_idx, val_idx = dense.carved()
    val = dense.dataset("val")
    assert isinstance(val, Subset) and len(val) == len(val_idx) == 3
    assert [val[j]["id"] for j in range(len(val))] == val_idx
    for j in range(len(val)):
        _check_dense_sample(val[j], H, W)
    # the same ids in another DenseData (another process or run) and in every epoch
    other = data().dataset("val")
    assert [other[j]["id"] for j in range(len(other))] == val_idx
    first, second = _ids_over_epochs(val)
    assert first == second == {i: i for i in val_idx}
    train = dense.dataset("train", train=True)
    assert sorted(_ids_over_epochs(train, epochs=1)[0]) == train_idx
    assert not set(train_idx) & set(val_idx)
    batch = next(iter(DataLoader(train, batch_size=4)))
    assert batch["id"].tolist() == train_idx[:4]
    assert batch["aug"]["crop"].shape == (4, 4)
    test = dense.dataset("test")
    assert [test[j]["id"] for j in range(len(test))] == [0, 1, 2]
