"""The exported student: ``student/model.safetensors`` + ``student/manifest.json``, one format.

The manifest records the architecture, every task (kind, stream, classes or output channels,
main metric), the preprocessing of each stream, the teachers the student was distilled from
(weights hashes, validation metrics), how it was selected (on validation) and the sha256 of the
weights. The alignment adapters, the objective's and the weighting's state are not exported.
:func:`load_student` rebuilds it strictly, checking the hash. Students written by unirep 0.1
(``unirep-student/1``, ``unirep-dense-student/1``) load too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from unirep import __version__
from unirep.io import atomic_write_json, file_sha256, load_weights, read_json, save_weights
from unirep.models.build import build_network
from unirep.tasks import TASK_KINDS, Task

STUDENT_MANIFEST = "manifest.json"
STUDENT_FORMAT = "unirep-student/2"
_OLD_DENSE_STREAM = "images"


def teacher_records(teachers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The student manifest's record of each teacher: its weights hash and validation metrics."""
    return {
        t: {
            "weights_sha256": teacher.manifest["weights_sha256"],
            "key": teacher.manifest.get("key"),
            "val_metrics": teacher.manifest["val_metrics"],
        }
        for t, teacher in teachers.items()
    }


def export_student(
    directory: Path,
    net: nn.Module,
    *,
    preset: str,
    architecture: dict[str, Any],
    tasks: dict[str, Task],
    preprocessing: dict[str, dict[str, Any]],
    teachers: dict[str, Any],
    selection: dict[str, Any],
) -> dict[str, Any]:
    """Write the student's weights, then its manifest (each atomically); returns the manifest."""
    digest = save_weights(Path(directory) / "model.safetensors", net.state_dict())
    manifest = {
        "format": STUDENT_FORMAT,
        "unirep_version": __version__,
        "preset": preset,
        "architecture": architecture,
        "feature_dim": int(net.feature_dim),  # type: ignore[arg-type]
        "tasks": {n: t.record() for n, t in tasks.items()},
        "preprocessing": preprocessing,
        "teachers": teacher_records(teachers),
        "selection": selection,
        "weights_sha256": digest,
    }
    atomic_write_json(Path(directory) / STUDENT_MANIFEST, manifest)
    return manifest


def read_student(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An exported student's manifest and weights, the weights checked against its hash."""
    directory = Path(directory)
    manifest = read_json(directory / STUDENT_MANIFEST, what="student manifest")
    weights = directory / "model.safetensors"
    if file_sha256(weights) != manifest.get("weights_sha256"):
        raise ValueError(f"student weights {str(weights)!r} do not match the hash in its manifest")
    return manifest, load_weights(weights)


def student_tasks(manifest: dict[str, Any]) -> dict[str, Task]:
    """The tasks an exported student predicts (any manifest format)."""
    tasks = {}
    for name, record in manifest["tasks"].items():
        if "kind" in record:
            tasks[name] = Task.from_record(name, record)
        elif record.get("type") == "classification":  # unirep-student/1
            tasks[name] = Task(
                name, TASK_KINDS.build("classification"), name, record["num_classes"],
                class_names=record.get("class_names"),
            )  # fmt: skip
        else:  # unirep-dense-student/1: a task's name was its kind
            kind = TASK_KINDS.build(name)
            classes = record["out_channels"] if kind.has_classes else None
            tasks[name] = Task(name, kind, _OLD_DENSE_STREAM, classes)
    return tasks


def student_preprocessing(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{stream: preprocessing}`` of an exported student (any manifest format)."""
    if "preprocessing" in manifest and manifest.get("format") == STUDENT_FORMAT:
        return manifest["preprocessing"]
    if "preprocessing" in manifest:  # unirep-dense-student/1
        return {_OLD_DENSE_STREAM: manifest["preprocessing"]}
    return {n: r["preprocessing"] for n, r in manifest["tasks"].items()}


def load_student(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported student (strict load, hash checked); returns (net, manifest)."""
    manifest, state = read_student(directory)
    net = build_network(manifest["architecture"], student_tasks(manifest))
    net.load_state_dict(state, strict=True)
    net.eval()
    return net, manifest
