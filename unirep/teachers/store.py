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

from unirep.config.load import cache_dir
from unirep.config.schema import Config
from unirep.errors import MissingFileError, TeacherMismatchError
from unirep.io import (
    atomic_write_json,
    check_finite_weights,
    file_sha256,
    load_weights,
    read_record,
    save_weights,
)
from unirep.layout import TEACHER_MANIFEST, WEIGHTS
from unirep.models.build import build_network
from unirep.tasks import Task
from unirep.version import __version__

MANIFEST = TEACHER_MANIFEST


@dataclass
class Teacher:
    """A frozen single-task network (a classification domain or a dense task) and its manifest."""

    task: str
    net: Any
    manifest: dict[str, Any]

    @property
    def feature_dim(self) -> int:
        """Width of the feature the student's alignment adapters map to."""
        return int(self.net.feature_dim)


def save_teacher(
    directory: Path,
    net: nn.Module,
    task: Task,
    architecture: dict[str, Any],
    preprocessing: dict[str, Any],
    data: dict[str, Any],
    val_metrics: dict[str, float | None],
    training: dict[str, Any],
    key: str | None = None,
) -> dict[str, Any]:
    """Write the weights, then the manifest (each atomically); returns the manifest.

    ``key`` hashes what determined the weights (:func:`unirep.stage_one.keys.teacher_key`); weights
    with a NaN or inf are refused (:class:`~unirep.errors.NonFiniteError`) before anything is
    written.
    """
    check_finite_weights(net.state_dict(), f"teacher {task.name!r} is not saved")
    fields: dict[str, Any] = {
        "domain": task.name,
        "key": key,  # the task's name (a Decathlon domain or a dense task)
        "kind": task.kind.name,
        "architecture": architecture,
        "out_channels": task.out_channels,
        "feature_dim": int(net.feature_dim),  # type: ignore[arg-type]
        "preprocessing": preprocessing,
        "data": data,
        "val_metrics": val_metrics,
        "training": training,
    }
    if task.num_classes is not None:
        fields["num_classes"] = task.num_classes
        fields["class_names"] = task.class_names
    digest = save_weights(Path(directory) / WEIGHTS, net.state_dict())
    manifest = {**fields, "weights_sha256": digest, "unirep_version": __version__}
    atomic_write_json(Path(directory) / MANIFEST, manifest)
    return manifest


def _remedy(directory: Path) -> str:
    """What to do about a damaged cached teacher: it is never silently retrained."""
    return (
        f"delete the folder {str(directory)!r} so that the next run trains this teacher again "
        "(or set teachers.retrain=true)"
    )


def read_manifest(directory: Path) -> dict[str, Any]:
    """The teacher manifest, with an error naming the file when absent, not JSON or not a
    record (:class:`MissingFileError`, :class:`TeacherMismatchError`), saying what to do."""
    directory = Path(directory)
    path = directory / MANIFEST
    manifest = read_record(path, "teacher manifest", _remedy(directory), TeacherMismatchError)
    if not isinstance(manifest.get("architecture"), dict):
        raise TeacherMismatchError(
            f"teacher manifest {str(path)!r} is damaged (not a teacher record: no architecture); "
            f"{_remedy(directory)}"
        )
    return manifest


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
            + f"; {_remedy(Path(path).parent)}"
        )


def _verified_manifest(
    directory: Path,
    task: str,
    architecture: dict[str, Any] | None,
    data_fingerprint: str | None,
    expected: dict[str, Any],
    recipe_key: str | None = None,
) -> tuple[dict[str, Any], Path]:
    """The manifest and weights path of a teacher, after checking each expectation given.

    ``expected`` maps manifest keys (e.g. ``num_classes``) to the values the run needs; None
    values, and keys an older manifest does not have, are not checked. Errors name the file and
    the mismatch.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    where = str(directory / MANIFEST)
    if manifest.get("domain") != task:
        raise TeacherMismatchError(
            f"teacher {where!r} is for task {manifest.get('domain')!r}, expected {task!r}"
        )
    for key, value in expected.items():
        if value is not None and key in manifest and manifest[key] != value:
            what = key.replace("num_", "").replace("_", " ")
            raise TeacherMismatchError(
                f"teacher {where!r} has {manifest.get(key)} {what} but task {task!r} has "
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
            f"teacher {where!r} was trained on other data for {task!r} (data fingerprint "
            f"{recorded} vs {data_fingerprint}); set teachers.retrain=true or another teachers.root"
        )
    if recipe_key is not None and manifest.get("key") != recipe_key:
        raise TeacherMismatchError(
            f"teacher {where!r} was trained with another recipe, data or architecture (key "
            f"{str(manifest.get('key'))[:12]} vs {recipe_key[:12]}); it is not the teacher of "
            "this run"
        )
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise MissingFileError(
            f"teacher weights {str(weights)!r} do not exist; {_remedy(directory)}"
        )
    digest = file_sha256(weights)
    if digest != manifest.get("weights_sha256"):
        raise TeacherMismatchError(
            f"teacher weights {str(weights)!r} have sha256 {digest[:12]}…, but {where!r} records "
            f"{str(manifest.get('weights_sha256'))[:12]}…: the file was replaced or corrupted; "
            f"{_remedy(directory)}"
        )
    return manifest, weights


def _load_strict(weights: Path, net: nn.Module) -> None:
    try:
        state = load_weights(weights)
    except ValueError as err:  # not safetensors (its hash was recorded so: a damaged save)
        raise TeacherMismatchError(f"{err}; {_remedy(weights.parent)}") from None
    _check_state(weights, net, state)
    check_finite_weights(state, f"teacher weights {str(weights)!r} cannot be used")
    net.load_state_dict(state, strict=True)


def load_teacher(
    directory: Path,
    task: Task,
    architecture: dict[str, Any] | None = None,
    data_fingerprint: str | None = None,
    key: str | None = None,
) -> Teacher:
    """Load and verify a teacher for ``task``; each expectation given is checked, naming the
    file and the mismatch (task, classes / output channels, architecture, data, recipe key,
    weights, finite values)."""
    manifest, weights = _verified_manifest(
        directory,
        task.name,
        architecture,
        data_fingerprint,
        {"num_classes": task.num_classes, "out_channels": task.out_channels},
        key,
    )
    try:
        net = build_network(manifest["architecture"], {task.name: task})
    except (KeyError, TypeError, ValueError) as err:  # an architecture this unirep cannot build
        raise TeacherMismatchError(
            f"teacher {str(Path(directory) / MANIFEST)!r} records an architecture this unirep "
            f"cannot build ({manifest['architecture']}: {err}); {_remedy(Path(directory))}"
        ) from None
    _load_strict(weights, net)
    return Teacher(task.name, freeze(net), manifest)


def freeze(net: nn.Module) -> Any:
    """Eval mode and no gradients: teachers are never trained nor wrapped for DDP."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def teacher_root(cfg: Config) -> Path:
    """Where teachers (and the teacher-output cache) live: ``teachers.root``, else
    ``<cache_dir>/teachers``."""
    return (
        Path(cfg.teachers.root).expanduser() if cfg.teachers.root else cache_dir(cfg) / "teachers"
    )


def teacher_folder(cfg: Config, task: str, key: str) -> Path:
    """The cache folder of the teacher of ``task`` with ``key``."""
    return teacher_root(cfg) / f"{task}-{key[:12]}"
