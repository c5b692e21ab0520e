"""Mini-scenes: MTAN-format tree, validity conventions, geometric consistency, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from unirep.data.dense.mini_scenes import (
    MAX_DEPTH,
    SCENE_CLASSES,
    ensure_mini_scenes,
    generate_mini_scenes,
    render_scene,
    view_rays,
)
from unirep.data.dense.mtan import MTANDense

H, W, SCALE = 24, 32, 0.05  # 12 / 3 / 6 scenes
FLOOR, WALL, CEILING, SPHERE = (
    SCENE_CLASSES.index(c) for c in ("floor", "wall", "ceiling", "sphere")
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_mini_scenes(
        tmp_path_factory.mktemp("scenes") / "mini", height=H, width=W, scale=SCALE
    )


@pytest.fixture(scope="module")
def scenes() -> list[dict[str, np.ndarray]]:
    """Renders at a higher resolution, for the geometric checks."""
    return [render_scene(np.random.default_rng([7, 0, i]), 48, 64) for i in range(24)]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.npy"))
    }


@pytest.mark.parametrize(("split", "count"), [("train", 12), ("val", 3), ("test", 6)])
def test_tree_reads_with_mtan_reader(root: Path, split: str, count: int) -> None:
    ds = MTANDense(root, split, tasks=["semantic", "depth", "normal"])
    assert len(ds) == count
    sample = ds[0]
    assert sample["image"].shape == (3, H, W) and sample["image"].dtype == torch.float32
    assert sample["semantic"].shape == (H, W) and sample["semantic"].dtype == torch.int64
    assert sample["depth"].shape == (1, H, W) and sample["depth"].dtype == torch.float32
    assert sample["normal"].shape == (3, H, W) and sample["normal"].dtype == torch.float32
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    assert set(sample["semantic"].unique().tolist()) <= set(range(-1, len(SCENE_CLASSES)))
    raw = np.load(root / split / "label" / "0.npy")
    assert raw.dtype == np.float32 and raw.shape == (H, W)  # stored as float, like MTAN's release


def test_validity_conventions(scenes: list[dict[str, np.ndarray]]) -> None:
    for s in scenes:
        label, depth, normal = s["label"], s["depth"][..., 0], s["normal"]
        norm = np.linalg.norm(normal, axis=-1)
        hit = label >= 0
        np.testing.assert_allclose(norm[hit], 1.0, atol=1e-5)
        assert np.all(normal[~hit] == 0)  # nothing hit: all-zero normal ...
        assert np.all(depth[~hit] == 0)  # ... and no depth
        assert np.all(depth[depth != 0] > 0) and depth.max() <= MAX_DEPTH
        assert np.all(hit[depth > 0])  # a depth reading always has a label


def test_invalid_fractions_within_bounds(scenes: list[dict[str, np.ndarray]]) -> None:
    no_hit = np.mean([np.mean(s["label"] < 0) for s in scenes])
    dropout = [np.mean((s["depth"][..., 0] == 0) & (s["label"] >= 0)) for s in scenes]
    assert no_hit < 0.15
    assert 0.001 < min(dropout) and max(dropout) < 0.1 and 0.005 < np.mean(dropout) < 0.05


def test_floor_normal_is_the_up_vector_and_points_lie_on_the_floor(scenes) -> None:
    seen = 0
    for s in scenes:
        label, depth, normal = s["label"], s["depth"][..., 0], s["normal"]
        floor = label == FLOOR
        if floor.sum() < 10:
            continue
        seen += 1
        up = normal[floor][0]
        assert np.all(normal[floor] == up)  # one plane, one normal per scene
        assert up[1] < -0.7  # upright camera, y down: the floor normal points up the image
        # back-projected floor points satisfy up · P = -camera height, the same for all
        points = (depth[..., None] * view_rays(48, 64))[floor & (depth > 0)]
        offset = points @ up
        assert 0.9 < -offset.mean() < 1.8 and np.ptp(offset) < 1e-3 * np.abs(offset).max() + 1e-4
        # walls are vertical, the ceiling faces down
        wall = normal[label == WALL]
        np.testing.assert_allclose(wall @ up, 0.0, atol=1e-5)
        np.testing.assert_allclose(normal[label == CEILING] @ up, -1.0, atol=1e-5)
    assert seen > len(scenes) // 2


def test_normals_face_the_camera(scenes: list[dict[str, np.ndarray]]) -> None:
    rays = view_rays(48, 64)
    spheres = 0
    for s in scenes:
        hit = s["label"] >= 0
        facing = np.einsum("hwc,hwc->hw", s["normal"], rays)
        assert np.all(facing[hit] < 1e-6)
        sphere = s["label"] == SPHERE
        spheres += int(sphere.sum())
        assert np.all(facing[sphere] < 0)
    assert spheres > 0


def test_generation_is_deterministic(root: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_mini_scenes(again, height=H, width=W, scale=SCALE)
    assert _tree_digest(again) == _tree_digest(root)
    other = tmp_path / "other"
    generate_mini_scenes(other, seed=1, height=H, width=W, scale=SCALE)
    assert _tree_digest(other) != _tree_digest(root)


def test_ensure_regenerates_only_when_needed(tmp_path: Path) -> None:
    root = tmp_path / "mini"
    ensure_mini_scenes(root, height=12, width=16, scale=0.01)
    probe = root / "train" / "image" / "0.npy"
    stamp = probe.stat().st_mtime_ns
    ensure_mini_scenes(root, height=12, width=16, scale=0.01)
    assert probe.stat().st_mtime_ns == stamp  # same parameters: untouched
    ensure_mini_scenes(root, height=12, width=20, scale=0.01)
    assert np.load(probe).shape == (12, 20, 3)  # other parameters: regenerated
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    empty = tmp_path / "empty"
    empty.mkdir()
    ensure_mini_scenes(empty, height=12, width=16, scale=0.01)  # no marker: generated
    assert (empty / ".complete").exists() and (empty / "test" / "depth" / "0.npy").exists()


def test_refuses_to_replace_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate_mini_scenes(tmp_path / "mine", height=12, width=16, scale=0.01)
    assert (tmp_path / "mine" / "keep.txt").exists()
