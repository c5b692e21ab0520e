"""Shared fixtures: a tiny generated benchmark and configs that train in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from unirep.config import Config, load_config

TINY = [
    "data.generator={seed: 0, image_size: 32, scale: 0.1}",
    "data.domains=[digits, objects, textures]",
    "data.batch_size=8",
    "data.eval_batch_size=64",
    "teachers.train.max_steps=6",
    "teachers.train.eval_every=3",
    "teachers.train.checkpoint_every=3",
    "teachers.train.log_every=2",
    "teachers.finetune_train.max_steps=4",
    "teachers.finetune_train.eval_every=2",
    "teachers.finetune_train.checkpoint_every=2",
    "teachers.finetune_train.log_every=2",
    "train.max_steps=6",
    "train.eval_every=3",
    "train.checkpoint_every=2",
    "train.log_every=2",
    "progress=false",
]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir shared by the session (the generated tiny benchmark lives there)."""
    return tmp_path_factory.mktemp("unirep-cache")


def tiny_config(cache: Path, out: Path, *extra: str) -> Config:
    """The mini-decathlon preset shrunk to a few images and steps."""
    return load_config(
        "mini-decathlon",
        [*TINY, f"data.cache_dir={cache}", f"output_dir={out}", *extra],
    )
