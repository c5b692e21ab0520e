"""Teacher checkpoints: ``<teacher_root>/<preset>/<domain>/{model.safetensors, teacher.json}``.

``teacher.json`` records the architecture, the domain and its classes, the preprocessing, the data
the teacher saw (split and a fingerprint of its annotation file), its validation metrics and the
sha256 of the weights. Loading checks every one of these against what the run expects and names
the file and the mismatch; weights are loaded strictly (never a silent partial load).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unirep import __version__
from unirep.io import atomic_write_json, file_sha256, load_weights, read_json, save_weights
from unirep.models.network import MultiDomainNet, build_network

WEIGHTS = "model.safetensors"
MANIFEST = "teacher.json"


class TeacherMismatchError(ValueError):
    """A teacher checkpoint does not fit the run (domain, classes, architecture, data, weights)."""


@dataclass
class Teacher:
    """A frozen single-domain network and its manifest."""

    domain: str
    net: MultiDomainNet
    manifest: dict[str, Any]

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim


def teacher_dir(root: Path, preset: str, domain: str) -> Path:
    return Path(root) / preset / domain


def save_teacher(
    directory: Path,
    net: MultiDomainNet,
    domain: str,
    architecture: dict[str, Any],
    preprocessing: dict[str, Any],
    data: dict[str, Any],
    val_metrics: dict[str, float],
    training: dict[str, Any],
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Write the weights, then the manifest (each atomically); returns the manifest."""
    return _write_teacher(
        directory,
        net,
        {
            "domain": domain,
            "architecture": architecture,
            "num_classes": net.heads[domain].out_features,
            "feature_dim": net.feature_dim,
            "class_names": class_names,
            "preprocessing": preprocessing,
            "data": data,
            "val_metrics": val_metrics,
            "training": training,
        },
    )


def _write_teacher(directory: Path, net: nn.Module, fields: dict[str, Any]) -> dict[str, Any]:
    """Weights first, then the manifest (``fields`` + weights hash + version), each atomically."""
    digest = save_weights(Path(directory) / WEIGHTS, net.state_dict())
    manifest = {**fields, "weights_sha256": digest, "unirep_version": __version__}
    atomic_write_json(Path(directory) / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    """The teacher manifest, with an error naming the file when absent or unreadable."""
    return read_json(Path(directory) / MANIFEST, what="teacher manifest")


def _check_state(path: Path, net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        problems.append(f"shape mismatches {shapes[:5]}{' ...' if len(shapes) > 5 else ''}")
    if problems:
        raise TeacherMismatchError(
            f"teacher weights {str(path)!r} do not match the architecture in its manifest: "
            + "; ".join(problems)
        )


def _verified_manifest(
    directory: Path,
    domain: str,
    architecture: dict[str, Any] | None,
    data_fingerprint: str | None,
    expected: dict[str, Any],
) -> tuple[dict[str, Any], Path]:
    """The manifest and weights path of a teacher, after checking each expectation given.

    ``expected`` maps manifest keys (e.g. ``num_classes``) to the values the run needs; None
    values are not checked. Errors name the file and the mismatch.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    where = str(directory / MANIFEST)
    kind = "task" if manifest.get("type") == "dense" else "domain"
    if manifest.get("domain") != domain:
        raise TeacherMismatchError(
            f"teacher {where!r} is for {kind} {manifest.get('domain')!r}, expected {domain!r}"
        )
    for key, value in expected.items():
        if value is not None and manifest.get(key) != value:
            what = key.replace("num_", "").replace("_", " ")
            raise TeacherMismatchError(
                f"teacher {where!r} has {manifest.get(key)} {what} but {kind} {domain!r} has "
                f"{value} in the data (set teachers.retrain=true or another teachers.root)"
            )
    if architecture is not None and manifest.get("architecture") != architecture:
        raise TeacherMismatchError(
            f"teacher {where!r} is a {manifest.get('architecture')} but the config asks for "
            f"{architecture} (set teachers.retrain=true or another teachers.root)"
        )
    recorded = manifest.get("data", {}).get("fingerprint")
    if data_fingerprint is not None and recorded != data_fingerprint:
        raise TeacherMismatchError(
            f"teacher {where!r} was trained on other data for {domain!r} (data fingerprint "
            f"{recorded} vs {data_fingerprint}); set teachers.retrain=true or another teachers.root"
        )
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"teacher weights {str(weights)!r} do not exist")
    digest = file_sha256(weights)
    if digest != manifest.get("weights_sha256"):
        raise TeacherMismatchError(
            f"teacher weights {str(weights)!r} have sha256 {digest[:12]}…, but {where!r} records "
            f"{str(manifest.get('weights_sha256'))[:12]}…: the file was replaced or corrupted"
        )
    return manifest, weights


def _load_strict(weights: Path, net: nn.Module) -> None:
    state = load_weights(weights)
    _check_state(weights, net, state)
    net.load_state_dict(state, strict=True)


def load_teacher(
    directory: Path,
    domain: str,
    num_classes: int | None = None,
    architecture: dict[str, Any] | None = None,
    data_fingerprint: str | None = None,
) -> Teacher:
    """Load and verify a teacher; each expectation given is checked, naming file and mismatch."""
    manifest, weights = _verified_manifest(
        directory, domain, architecture, data_fingerprint, {"num_classes": num_classes}
    )
    arch = manifest["architecture"]
    net = build_network(
        arch["backbone"], arch.get("backbone_kwargs", {}), {domain: manifest["num_classes"]}
    )
    _load_strict(weights, net)
    return Teacher(domain, freeze(net), manifest)


# --------------------------------------------------------------------------------------------
# Dense teachers: one single-task DenseMultiTaskNet per task


@dataclass
class DenseTeacher:
    """A frozen single-task dense network (:class:`~unirep.models.dense.DenseMultiTaskNet`)."""

    task: str
    net: Any
    manifest: dict[str, Any]

    @property
    def feature_dim(self) -> int:
        """Width of its last decoder feature, the target of the student's alignment adapters."""
        return int(self.net.decoder_channels)


def save_dense_teacher(
    directory: Path,
    net: nn.Module,
    task: str,
    architecture: dict[str, Any],
    preprocessing: dict[str, Any],
    data: dict[str, Any],
    val_metrics: dict[str, float],
    training: dict[str, Any],
) -> dict[str, Any]:
    """Write a dense teacher's weights, then its manifest (each atomically)."""
    return _write_teacher(
        directory,
        net,
        {
            "type": "dense",
            "domain": task,
            "architecture": architecture,
            "out_channels": net.task_channels[task],
            "feature_dim": net.decoder_channels,
            "preprocessing": preprocessing,
            "data": data,
            "val_metrics": val_metrics,
            "training": training,
        },
    )


def load_dense_teacher(
    directory: Path,
    task: str,
    out_channels: int | None = None,
    architecture: dict[str, Any] | None = None,
    data_fingerprint: str | None = None,
) -> DenseTeacher:
    """Load and verify a dense teacher (task, output channels, architecture, data, weights)."""
    from unirep.models.dense import build_dense_from_architecture

    manifest, weights = _verified_manifest(
        directory, task, architecture, data_fingerprint, {"out_channels": out_channels}
    )
    net = build_dense_from_architecture(manifest["architecture"], {task: manifest["out_channels"]})
    _load_strict(weights, net)
    return DenseTeacher(task, freeze(net), manifest)


def freeze(net: nn.Module) -> Any:
    """Eval mode and no gradients: teachers are never trained nor wrapped for DDP."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
