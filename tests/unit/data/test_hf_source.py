"""A Hugging Face `datasets` folder as a domain of a run, beside or instead of a Decathlon tree."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from unirep.stage_one.train import ensure_teachers

from tests.conftest import tiny_config
from unirep.data.classification.decathlon import DataRootError
from unirep.pipeline.rundir import make_accelerator, prepare_run_dir
from unirep.pipeline.stage_two import distill, resolve_data

pytestmark = pytest.mark.slow


def _saved_dataset(folder: Path) -> Path:
    rng = np.random.default_rng(0)

    def split(n: int) -> datasets.Dataset:
        labels = [i % 3 for i in range(n)]
        images = []
        for label in labels:
            pixels = rng.integers(0, 80, (36, 40, 3)).astype(np.uint8)
            pixels[..., label] += 150
            images.append(Image.fromarray(pixels))
        features = datasets.Features(
            {"img": datasets.Image(), "kind": datasets.ClassLabel(names=["r", "g", "b"])}
        )
        return datasets.Dataset.from_dict({"img": images, "kind": labels}, features=features)

    splits = {"train": split(24), "validation": split(9), "test": split(9)}
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


HF = "classification.hf_domains={{pets: {{path: {path}, image_column: img, label_column: kind}}}}"


def test_hf_domain_joins_a_run(tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = _saved_dataset(tmp_path / "pets")
    cfg = tiny_config(
        tiny_cache,
        tmp_path / "runs",
        "classification.domains=[objects, pets]",
        HF.format(path=path),
        f"teachers.root={tmp_path / 'teachers'}",
        "name=hf",
    )
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    assert list(data.tasks()) == data.streams() == ["objects", "pets"]
    assert data.datasets("val")["pets"][0]["image"].shape == (3, 28, 28)
    run_dir = prepare_run_dir(cfg, accelerator)
    metrics = distill(
        cfg, accelerator, data, run_dir, ensure_teachers(cfg, accelerator, data, run_dir)
    )
    assert set(metrics["tasks"]) == {"objects", "pets"}
    assert metrics["tasks"]["pets"]["student"]["accuracy"] is not None


def test_hf_only_source_and_errors(tiny_cache: Path, tmp_path: Path) -> None:
    path = _saved_dataset(tmp_path / "pets")
    only_pets = [
        "classification.finetune_from=null",
        "classification.init_from_teacher=null",
        "classification.no_flip=[]",
    ]
    cfg = tiny_config(
        tiny_cache,
        tmp_path,
        "data.source=hf",
        "classification.domains=[]",
        HF.format(path=path),
        *only_pets,
    )
    data = resolve_data(cfg, make_accelerator(cfg))
    assert list(data.tasks()) == ["pets"] and data.tasks()["pets"].num_classes == 3
    assert data.datasets("train")["pets"].num_classes == 3
    empty = tiny_config(
        tiny_cache, tmp_path, "data.source=hf", "classification.domains=[]", *only_pets
    )
    with pytest.raises(DataRootError, match="hf_domains"):
        resolve_data(empty, make_accelerator(empty))
    clash = tiny_config(tiny_cache, tmp_path, HF.replace("pets", "digits").format(path=path))
    with pytest.raises(DataRootError, match="digits"):
        resolve_data(clash, make_accelerator(clash))
