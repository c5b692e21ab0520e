"""The model card (``student/README.md``): its fields, and the command that reproduces the run.

The card of a real run is checked end to end in ``test_api.py``; here its parts are checked on a
made-up manifest and metrics, and the command on configs that stress the override writer.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, TINY_DENSE
from unirep.config.load import save_config, to_dict
from unirep.pipeline.model_card import NOT_REPRODUCING, model_card, reproduce_command, run_overrides
from unirep.pipeline.validate import load_config


def _reproducing(cfg) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if k not in NOT_REPRODUCING}


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("mini-decathlon", [*TINY, "data.cache_dir=/tmp/c", "output_dir=/tmp/o", "name=r"]),
        ("mini-scenes", [*TINY_DENSE, "weighting=uncertainty", "seed=3"]),
        # a section replaced by a smaller one: keys of the preset the run does not have
        ("mini-decathlon", ["data.generator={seed: 1}", "classification.backbone=resnet10t"]),
        ("mini-scenes", ["dense.tasks={semantic: {loss: cross_entropy}}", "resume=true"]),
        ("mini-decathlon", []),
    ],
)
def test_the_command_gives_the_config_back(preset: str, overrides: list[str]) -> None:
    cfg = load_config(preset, overrides)
    command = reproduce_command(cfg, "unused.yaml")
    words = shlex.split(command)
    assert words[:5] == ["accelerate", "launch", "scripts/distill.py", "--config", preset]
    assert not any(w.split("=")[0] in NOT_REPRODUCING for w in words[5:])
    assert _reproducing(load_config(preset, words[5:])) == _reproducing(cfg)


def test_a_config_file_that_is_no_preset_is_named_in_the_command(tmp_path: Path) -> None:
    cfg = load_config("mini-scenes", ["seed=4"])
    path = tmp_path / "my run.yaml"
    save_config(cfg, path)
    mine = load_config(str(path))
    assert mine.preset == "mini-scenes"  # the saved config keeps its preset's name...
    custom = tmp_path / "custom.yaml"
    custom.write_text(yaml.safe_dump({**to_dict(cfg), "preset": "my-own"}))
    own = load_config(str(custom))
    assert run_overrides(own) is None  # ...a config of its own cannot be written as overrides
    command = reproduce_command(own, str(custom))
    assert shlex.split(command)[3:] == ["--config", str(custom)]


SEMANTIC = {"kind": "semantic", "stream": "images", "out_channels": 7, "main_metric": "miou"}
DEPTH = {"kind": "depth", "stream": "images", "out_channels": 1, "main_metric": "abs_err"}
MANIFEST = {
    "unirep_version": "0.3.0",
    "architecture": {"encoder": "segnet", "encoder_kwargs": {"width_mult": 0.25}},
    "tasks": {"semantic": SEMANTIC, "depth": DEPTH},
    "preprocessing": {"images": {"image_size": [48, 64]}},
    "teachers": {
        "semantic": {"weights_sha256": "a" * 64, "key": "k1", "val_metrics": {"miou": 0.5}},
        "depth": {"weights_sha256": "b" * 64, "key": "k2", "val_metrics": {"abs_err": 0.25}},
    },
    "selection": {"split": "val", "best_step": 40, "val_delta_m": -1.5},
    "weights_sha256": "c" * 64,
    "timm_backbone": {
        "folder": "backbone",
        "architecture": "segnet_mtan",
        "weights_sha256": "d" * 64,
    },
}
METRICS = {
    "preset": "mini-scenes",
    "split": "test",
    "tasks": {
        "semantic": {
            "student": {"miou": 0.41234, "pixel_acc": 0.7},
            "teacher": {"miou": 0.4, "pixel_acc": 0.69},
        },
        "depth": {
            "student": {"abs_err": 0.3, "rel_err": None},
            "teacher": {"abs_err": 0.31, "rel_err": 0.2},
        },
    },
    "summary": {
        "delta_m_vs_teachers": 3.125,
        "train_seconds": 12.5,
        "params": {"student": 1234},
        "delta_m_metrics": ["semantic/miou", "depth/abs_err"],
    },
}
IMAGES = {"train": {"images": 12}, "val": {"images": 3}, "test": {"images": 6}}
DATA = {"source": "mini-scenes", "root": "/data/scenes", "images": IMAGES}
COMMAND = "accelerate launch scripts/distill.py x=1"


def test_the_card_holds_data_tasks_teachers_recipe_metrics_and_command() -> None:
    cfg = load_config("mini-scenes", ["name=card"])
    card = model_card(MANIFEST, METRICS, cfg, DATA, COMMAND)
    for needle in (
        "# unirep student: mini-scenes / card",
        "## Data", "source: `mini-scenes`, root `/data/scenes`", "train images 12",
        "| semantic | semantic | images | 7 | miou |", "| depth | depth | images | 1 | abs_err |",
        f"| semantic | `{'a' * 64}` | `k1` | miou 0.5000 |",
        f"| depth | `{'b' * 64}` | `k2` | abs_err 0.2500 |",
        "## Recipe", "encoder:", "width_mult: 0.25", "best_step 40", "val_delta_m -1.5000",
        "## Metrics (test split)",
        "| semantic | miou | 0.4123 | 0.4000 |", "| depth | rel_err | – | 0.2000 |",
        "Δm of the student vs the teachers (%): +3.12",
        "## Command", COMMAND,
        f"sha256 `{'c' * 64}`", "timm's `segnet_mtan`", "local-dir:",
    ):  # fmt: skip
        assert needle in card, needle
    assert "12.5" not in card and "seconds" not in card  # no wall-clock time: resumes agree
    assert card == model_card(
        MANIFEST, METRICS, cfg, DATA, "accelerate launch scripts/distill.py x=1"
    )


def test_a_student_without_a_timm_backbone_says_why() -> None:
    manifest = {**MANIFEST, "timm_backbone": {"folder": None, "reason": "residual adapters"}}
    card = model_card(manifest, METRICS, load_config("mini-scenes"), DATA, "cmd")
    assert "no timm backbone: residual adapters." in card
