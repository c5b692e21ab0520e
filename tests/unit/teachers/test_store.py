"""Teacher checkpoints: round trip, and every mismatch named with the file (never a silent load)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from unirep.io import load_weights, save_weights
from unirep.models.build import build_network
from unirep.tasks import TASK_KINDS, Task
from unirep.teachers.store import (
    MANIFEST,
    WEIGHTS,
    TeacherMismatchError,
    load_teacher,
    save_teacher,
)

ARCH = {"backbone": "resnet_decathlon_tiny", "backbone_kwargs": {}}


def _task(name: str = "digits", classes: int = 5) -> Task:
    return Task(name, TASK_KINDS.build("classification"), name, num_classes=classes)


def _net(classes: int) -> torch.nn.Module:
    return build_network(ARCH, {"digits": _task(classes=classes)})


def _save(directory: Path, classes: int = 5) -> torch.nn.Module:
    net = _net(classes)
    save_teacher(
        directory,
        net,
        _task(classes=classes),
        architecture=ARCH,
        preprocessing={"resize": 32, "crop": 28},
        data={"split": "train", "fingerprint": "abc"},
        val_metrics={"accuracy": 0.5},
        training={"steps": 1},
    )
    return net


def test_round_trip(tmp_path: Path) -> None:
    net = _save(tmp_path)
    teacher = load_teacher(tmp_path, _task(), architecture=ARCH, data_fingerprint="abc")
    assert teacher.task == "digits" and teacher.feature_dim == net.feature_dim
    assert not teacher.net.training
    assert not any(p.requires_grad for p in teacher.net.parameters())
    for k, v in net.state_dict().items():
        torch.testing.assert_close(teacher.net.state_dict()[k], v)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["num_classes"] == 5 and len(manifest["weights_sha256"]) == 64
    assert manifest["kind"] == "classification" and manifest["out_channels"] == 5
    assert teacher.manifest == manifest


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"task": _task("glyphs")}, "is for task 'digits'"),
        ({"task": _task(classes=7)}, "has 5 classes"),
        ({"architecture": {"backbone": "resnet26_decathlon", "backbone_kwargs": {}}}, "resnet26"),
        ({"data_fingerprint": "zzz"}, "other data"),
    ],
)
def test_mismatch_names_file(tmp_path: Path, kwargs: dict, needle: str) -> None:
    _save(tmp_path)
    args = {"task": _task(), **kwargs}
    with pytest.raises(TeacherMismatchError) as info:
        load_teacher(tmp_path, **args)
    assert str(tmp_path / MANIFEST) in str(info.value) and needle in str(info.value)


def test_replaced_weights_are_detected(tmp_path: Path) -> None:
    _save(tmp_path)
    other = _net(5)
    save_weights(tmp_path / WEIGHTS, other.state_dict())
    with pytest.raises(TeacherMismatchError, match="replaced or corrupted"):
        load_teacher(tmp_path, _task())


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    _save(tmp_path, classes=5)
    # weights of a 7-class head under a manifest that says 5 classes, hash updated to match
    wrong = _net(7).state_dict()
    digest = save_weights(tmp_path / WEIGHTS, wrong)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["weights_sha256"] = digest
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TeacherMismatchError) as info:
        load_teacher(tmp_path, _task())
    assert str(tmp_path / WEIGHTS) in str(info.value) and "shape" in str(info.value)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / MANIFEST))):
        load_teacher(tmp_path, _task())
    _save(tmp_path)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        load_teacher(tmp_path, _task())


def test_unreadable_weights_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        load_weights(tmp_path / "bad.safetensors")
