"""MTAN-format dense reader: exact on-disk format, errors, and the scale-crop/flip augmentation."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from unirep.data.classification.decathlon import DataRootError
from unirep.data.dense.mtan import (
    DENSE_TASKS,
    MTANDense,
    ScaleCrop,
    apply_scale_crop,
    sample_scale_crop,
    write_mtan_fixture,
)

H, W = 12, 16


def _write_positional(root: Path, label_dir: str = "label") -> dict[str, np.ndarray]:
    """One sample whose maps encode the pixel position p = r·W + c, to track correspondences.

    image: (r, c, 0.5); semantic: p, with -1 where p % 7 == 3; depth: 1 + p, with 0 where
    p % 5 == 2; normal: (1 + c, 1 + r, 1 + p), all-zero where p % 11 == 4.
    """
    r, c = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    pos = r * W + c
    image = np.stack([r, c, np.full_like(r, 0.5, dtype=float)], -1).astype(np.float32)
    label = np.where(pos % 7 == 3, -1, pos).astype(np.float32)
    depth = np.where(pos % 5 == 2, 0, 1 + pos)[..., None].astype(np.float32)
    normal = np.stack([1 + c, 1 + r, 1 + pos], -1).astype(np.float32)
    normal[pos % 11 == 4] = 0
    arrays = {"image": image, label_dir: label, "depth": depth, "normal": normal}
    for folder, array in arrays.items():
        (root / "train" / folder).mkdir(parents=True, exist_ok=True)
        np.save(root / "train" / folder / "0.npy", array)
    return {"image": image, "semantic": label, "depth": depth, "normal": normal, "pos": pos}


# ---- format -----------------------------------------------------------------------------


def test_reads_fixture_in_exact_format(tmp_path: Path) -> None:
    write_mtan_fixture(tmp_path, "train", n=3, height=H, width=W, classes=13)
    ds = MTANDense(tmp_path, "train", list(DENSE_TASKS))
    assert len(ds) == 3
    sample = ds[1]
    assert set(sample) == {"image", "semantic", "depth", "normal", "index", "id", "aug"}
    assert sample["index"] == sample["id"] == 1
    # without augmentation: scale 1, the full image, no flip
    assert float(sample["aug"]["scale"]) == 1.0 and not bool(sample["aug"]["flip"])
    assert sample["aug"]["crop"].tolist() == [0, 0, H, W]
    expected = {
        "image": ((3, H, W), torch.float32),
        "semantic": ((H, W), torch.int64),
        "depth": ((1, H, W), torch.float32),
        "normal": ((3, H, W), torch.float32),
    }
    for key, (shape, dtype) in expected.items():
        assert sample[key].shape == shape and sample[key].dtype == dtype, key
    # values as stored: no normalisation, just HWC -> CHW
    stored = np.load(tmp_path / "train" / "image" / "1.npy")
    assert np.array_equal(sample["image"].numpy(), stored.transpose(2, 0, 1))
    label = np.load(tmp_path / "train" / "label" / "1.npy")
    assert np.array_equal(sample["semantic"].numpy(), label.astype(np.int64))
    assert (sample["semantic"] == -1).any() and sample["semantic"].max() < 13
    assert (sample["depth"] == 0).any() and (sample["depth"] > 0).any()
    invalid_normal = (sample["normal"] == 0).all(0)
    assert invalid_normal.any()
    norms = sample["normal"].norm(dim=0)[~invalid_normal]
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_only_requested_tasks_and_cityscapes_labels(tmp_path: Path) -> None:
    write_mtan_fixture(tmp_path, "val", 2, H, W, classes=7, with_normals=False, label_dir="label_7")
    ds = MTANDense(tmp_path, "val", ["depth", "semantic"], label_dir="label_7")
    sample = ds[0]
    assert set(sample) == {"image", "semantic", "depth", "index", "id", "aug"}
    assert sample["semantic"].max() < 7
    assert set(MTANDense(tmp_path, "val", [])[1]) == {"image", "index", "id", "aug"}


def test_unknown_task_lists_valid_ones(tmp_path: Path) -> None:
    write_mtan_fixture(tmp_path, "train", 1, H, W, classes=13)
    with pytest.raises(ValueError, match="semantic, depth, normal"):
        MTANDense(tmp_path, "train", ["semantic", "edges"])
    with pytest.raises(ValueError, match="inverse_depth"):
        MTANDense(tmp_path, "train", ["depth"], depth_kind="disparity")


# ---- errors -----------------------------------------------------------------------------


def test_missing_root_split_and_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataRootError, match=r"nowhere.*MTAN preprocessed layout"):
        MTANDense(missing, "train", ["depth"])
    write_mtan_fixture(tmp_path, "train", 2, H, W, classes=13, with_normals=False)
    with pytest.raises(DataRootError, match=r"val.*does not exist"):
        MTANDense(tmp_path, "val", ["depth"])
    with pytest.raises(DataRootError, match=re.escape(str(tmp_path / "train" / "normal"))):
        MTANDense(tmp_path, "train", ["normal"])
    with pytest.raises(DataRootError, match="label_19"):
        MTANDense(tmp_path, "train", ["semantic"], label_dir="label_19")
    MTANDense(tmp_path, "train", ["semantic", "depth"])  # the present tasks are fine


def test_missing_file_is_named(tmp_path: Path) -> None:
    write_mtan_fixture(tmp_path, "train", 4, H, W, classes=13)
    (tmp_path / "train" / "depth" / "2.npy").unlink()
    with pytest.raises(DataRootError, match=re.escape(str(tmp_path / "train" / "depth" / "2.npy"))):
        MTANDense(tmp_path, "train", ["semantic", "depth"])
    MTANDense(tmp_path, "train", ["semantic", "normal"])  # depth not requested: fine
    # image indices must be 0..N-1 as well
    (tmp_path / "train" / "image" / "0.npy").rename(tmp_path / "train" / "image" / "7.npy")
    with pytest.raises(DataRootError, match=re.escape(str(tmp_path / "train" / "image" / "0.npy"))):
        MTANDense(tmp_path, "train", ["normal"])


def test_empty_image_folder(tmp_path: Path) -> None:
    (tmp_path / "train" / "image").mkdir(parents=True)
    with pytest.raises(DataRootError, match=r"no \.npy files"):
        MTANDense(tmp_path, "train", [])


# ---- augmentation -----------------------------------------------------------------------


def _seed_with(flipped: bool, scales: tuple[float, ...]) -> int:
    """A seed whose draws (scale index, top, left, flip coin) give the wanted flip decision."""
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        sample_scale_crop(H, W, scales, g)
        if (float(torch.rand((), generator=g)) < 0.5) == flipped:
            return seed
    raise AssertionError("no seed found")


def test_flip_only_mirrors_all_maps_and_negates_normal_x(tmp_path: Path) -> None:
    ref = _write_positional(tmp_path)
    seed = _seed_with(flipped=True, scales=(1.0,))
    g = torch.Generator().manual_seed(seed)
    ds = MTANDense(tmp_path, "train", list(DENSE_TASKS), augment=True, scales=(1.0,), generator=g)
    out = ds[0]
    img = ref["image"].transpose(2, 0, 1)
    assert np.array_equal(out["image"].numpy(), img[:, :, ::-1])
    assert np.array_equal(out["semantic"].numpy(), ref["semantic"][:, ::-1].astype(np.int64))
    assert np.array_equal(out["depth"][0].numpy(), ref["depth"][:, ::-1, 0])
    normal = ref["normal"].transpose(2, 0, 1)[:, :, ::-1]
    assert np.array_equal(out["normal"][0].numpy(), -normal[0])
    assert np.array_equal(out["normal"][1:].numpy(), normal[1:])
    # invalid normals stay exactly (+)0, and the ignore label and invalid depth move with the map
    invalid = (normal == 0).all(0)
    assert not torch.signbit(out["normal"][:, torch.from_numpy(invalid.copy())]).any()
    assert (out["semantic"] == -1).sum() == (ref["semantic"] == -1).sum()

    # the other coin side leaves everything untouched
    g = torch.Generator().manual_seed(_seed_with(flipped=False, scales=(1.0,)))
    ds = MTANDense(tmp_path, "train", list(DENSE_TASKS), augment=True, scales=(1.0,), generator=g)
    out = ds[0]
    assert np.array_equal(out["depth"][0].numpy(), ref["depth"][..., 0])
    assert np.array_equal(out["normal"].numpy(), ref["normal"].transpose(2, 0, 1))


@pytest.mark.parametrize(("depth_kind", "scale"), [("depth", 1.5), ("inverse_depth", 1.2)])
def test_scale_crop_known_window(tmp_path: Path, depth_kind: str, scale: float) -> None:
    ref = _write_positional(tmp_path)
    seed = _seed_with(flipped=False, scales=(scale,))
    crop = sample_scale_crop(H, W, (scale,), torch.Generator().manual_seed(seed))
    assert (crop.height, crop.width) == (int(H / scale), int(W / scale))
    g = torch.Generator().manual_seed(seed)
    ds = MTANDense(
        tmp_path, "train", list(DENSE_TASKS), depth_kind=depth_kind, augment=True,
        scales=(scale,), generator=g,
    )  # fmt: skip
    out = ds[0]

    # the depth map (undoing the depth scaling) tells which source pixel each output pixel took
    factor = scale if depth_kind == "depth" else 1 / scale
    depth_in = ref["depth"][..., 0]
    unscaled = out["depth"][0].numpy() * factor
    valid = unscaled > 0
    pos = np.rint(unscaled[valid]).astype(int) - 1
    assert np.allclose(unscaled[valid], pos + 1, atol=1e-3)  # an original value, ×1/s or ×s
    src_r, src_c = pos // W, pos % W
    assert src_r.min() >= crop.top and src_r.max() < crop.top + crop.height
    assert src_c.min() >= crop.left and src_c.max() < crop.left + crop.width

    # nearest: rows/cols of the output map to a fixed source row/col, monotonic, covering the crop
    rows = np.full((H, W), -1)
    rows[valid] = src_r
    row_of = np.array([np.unique(r[r >= 0])[0] for r in rows])
    assert all(len(np.unique(r[r >= 0])) == 1 for r in rows)
    assert np.all(np.diff(row_of) >= 0)
    assert set(row_of) == set(range(crop.top, crop.top + crop.height))
    cols = np.full((H, W), -1)
    cols[valid] = src_c
    col_of = np.array([np.unique(c[c >= 0])[0] for c in cols.T])
    assert set(col_of) == set(range(crop.left, crop.left + crop.width))

    # every nearest-resized map took the same source pixel; invalid depth stays exactly 0
    src_pos = row_of[:, None] * W + col_of[None, :]
    assert np.array_equal(out["depth"][0].numpy() == 0, depth_in.flat[src_pos] == 0)
    assert np.array_equal(out["semantic"].numpy(), ref["semantic"].flat[src_pos].astype(np.int64))
    assert (out["semantic"] == -1).any()
    normal_src = ref["normal"].reshape(-1, 3)[src_pos].transpose(2, 0, 1)
    assert np.array_equal(out["normal"].numpy(), normal_src)  # normals are not scaled

    # bilinear (align_corners) image of a ramp: output row y samples top + y·(h−1)/(H−1)
    ys = crop.top + np.arange(H) * (crop.height - 1) / (H - 1)
    xs = crop.left + np.arange(W) * (crop.width - 1) / (W - 1)
    assert np.allclose(out["image"][0].numpy(), np.broadcast_to(ys[:, None], (H, W)), atol=1e-4)
    assert np.allclose(out["image"][1].numpy(), np.broadcast_to(xs[None, :], (H, W)), atol=1e-4)


def test_scale_crop_then_flip(tmp_path: Path) -> None:
    """With the flip drawn too, the output is the flipped scale-crop of the same window."""
    _write_positional(tmp_path)
    scales = (1.2,)
    seed = _seed_with(flipped=True, scales=scales)
    crop = sample_scale_crop(H, W, scales, torch.Generator().manual_seed(seed))
    plain = MTANDense(tmp_path, "train", list(DENSE_TASKS))[0]
    expected = apply_scale_crop(plain, crop, "depth")
    g = torch.Generator().manual_seed(seed)
    out = MTANDense(tmp_path, "train", list(DENSE_TASKS), augment=True, scales=scales, generator=g)[
        0
    ]
    for key in ("image", "semantic", "depth"):
        assert torch.equal(out[key], expected[key].flip(-1)), key
    assert torch.equal(out["normal"][0], -expected["normal"][0].flip(-1))
    assert torch.equal(out["normal"][1:], expected["normal"][1:].flip(-1))


def test_apply_scale_crop_depth_factor() -> None:
    depth = torch.tensor([[[2.0, 0.0], [4.0, 8.0]]])
    sample = {"image": torch.zeros(3, 2, 2), "depth": depth}
    crop = ScaleCrop(2.0, 0, 0, 1, 1)  # zoom on the top-left pixel
    assert torch.equal(apply_scale_crop(sample, crop, "depth")["depth"], torch.full((1, 2, 2), 1.0))
    assert torch.equal(
        apply_scale_crop(sample, crop, "inverse_depth")["depth"], depth.new_full((1, 2, 2), 4.0)
    )
    invalid = ScaleCrop(2.0, 0, 1, 1, 1)
    assert torch.equal(apply_scale_crop(sample, invalid, "depth")["depth"], torch.zeros(1, 2, 2))


def test_augmentation_is_deterministic(tmp_path: Path) -> None:
    write_mtan_fixture(tmp_path, "train", 2, H, W, classes=13)

    def draw(generator: torch.Generator | None) -> list[dict]:
        ds = MTANDense(tmp_path, "train", list(DENSE_TASKS), augment=True, generator=generator)
        return [ds[i % 2] for i in range(6)]

    a = draw(torch.Generator().manual_seed(3))
    b = draw(torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    c = draw(None)
    torch.manual_seed(5)
    d = draw(None)
    for x, y in [*zip(a, b, strict=True), *zip(c, d, strict=True)]:
        for key in ("image", "semantic", "depth", "normal"):
            assert torch.equal(x[key], y[key])
    # and the augmentation does vary between draws
    assert any(not torch.equal(a[0]["depth"], s["depth"]) for s in a[2::2])
