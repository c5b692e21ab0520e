"""Data that would run but mislead: refused in one line, or read correctly, through the script a
user types (a one-class domain, a Hugging Face label only validation has, 16-bit images)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from unirep.data.classification.decathlon import to_rgb

ROOT = Path(__file__).resolve().parents[2]


def _hf_folder(folder: Path, train: list[str], val: list[str]) -> Path:
    """A saved ``datasets`` folder with plain string labels (no ``ClassLabel``)."""
    rng = np.random.default_rng(0)

    def split(labels: list[str]) -> datasets.Dataset:
        images = [
            Image.fromarray(rng.integers(0, 255, (20, 20, 3)).astype(np.uint8)) for _ in labels
        ]
        rows = {"img": images, "kind": labels}
        return datasets.Dataset.from_dict(rows).cast_column("img", datasets.Image())

    splits = {"train": split(train), "validation": split(val), "test": split(val)}
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def _distill(
    tmp_path: Path, hf_path: Path, script: str = "distill.py", *extra: str
) -> subprocess.CompletedProcess:
    domain = f"{{pets: {{path: {hf_path}, image_column: img, label_column: kind}}}}"
    args = [
        "data.source=hf", "classification.domains=[]", f"classification.hf_domains={domain}",
        "classification.finetune_from=null", "classification.init_from_teacher=null",
        "classification.no_flip=[]", "data.batch_size=2", f"output_dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}", f"teachers.root={tmp_path / 'teachers'}",
    ]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args, *extra],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def _one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and needle in errors[0], result.stderr[-3000:]


def test_a_label_only_validation_has_is_refused(tmp_path: Path) -> None:
    path = _hf_folder(tmp_path / "pets", ["cat", "dog"] * 3, ["cat", "dog", "bird"])
    result = _distill(tmp_path, path)
    _one_line_error(result, "label 'bird'")
    assert "never occurs in the training split" in result.stderr
    assert not (tmp_path / "teachers").exists()


def test_a_one_class_domain_is_refused(tmp_path: Path) -> None:
    path = _hf_folder(tmp_path / "pets", ["cat"] * 6, ["cat", "cat"])
    result = _distill(tmp_path, path)
    _one_line_error(result, "has 1 class; a classification domain needs at least 2")
    assert not (tmp_path / "teachers").exists()


def test_16_bit_images_keep_their_grey_levels(tmp_path: Path) -> None:
    """PIL's own conversion clips 16-bit values at 255 (an all-white image); unirep scales."""
    levels = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")
        rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    expected = np.rint(levels * (255 / 65535)).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    eight = tmp_path / "eight.png"
    Image.fromarray((levels // 257).astype(np.uint8)).save(eight)
    with Image.open(eight) as img:  # 8-bit images are unchanged
        assert np.array_equal(np.asarray(to_rgb(img))[..., 1], (levels // 257).astype(np.uint8))


def test_16_bit_images_train_with_their_grey_levels(tmp_path: Path) -> None:
    """A domain of 16-bit greyscale PNGs through the script: the normalisation statistics the
    run computes from its images are those of the scaled grey levels (about 0.3), not of
    white images (1.0), which PIL's own conversion would give."""
    rng = np.random.default_rng(0)

    def split(labels: list[str]) -> datasets.Dataset:
        levels = {"dark": 10000, "light": 30000}
        images = [
            Image.fromarray((levels[k] + rng.integers(0, 500, (20, 20))).astype(np.uint16))
            for k in labels
        ]
        return datasets.Dataset.from_dict({"img": images, "kind": labels}).cast_column(
            "img", datasets.Image()
        )

    labels = ["dark", "light"] * 4
    folder = tmp_path / "pets"
    datasets.DatasetDict({"train": split(labels), "validation": split(labels),
                          "test": split(labels)}).save_to_disk(str(folder))  # fmt: skip
    with Image.open(io.BytesIO(datasets.load_from_disk(str(folder))["train"].with_format(
        "arrow")["img"][0].as_py()["bytes"])) as img:  # fmt: skip
        assert img.mode.startswith("I")  # stored as 16-bit
    steps = [f"teachers.train.{k}=1" for k in ("max_steps", "eval_every", "checkpoint_every")]
    result = _distill(tmp_path, folder, "train_teachers.py", *steps)
    assert result.returncode == 0, result.stderr[-3000:]
    (stats,) = (tmp_path / "cache" / "stats").glob("pets-*.json")
    mean = json.loads(stats.read_text())["mean"]
    assert all(0.2 < m < 0.45 for m in mean), mean
