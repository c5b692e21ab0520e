"""The exported student: ``student/model.safetensors`` + ``student/manifest.json``, one format.

The manifest records the architecture, every task (kind, stream, classes or output channels,
main metric), the preprocessing of each stream, the teachers the student was distilled from
(weights hashes, validation metrics), how it was selected (on validation) and the sha256 of the
weights. The alignment adapters, the objective's and the weighting's state are not exported.
:func:`load_student` rebuilds it strictly, checking the hash. Students written by unirep 0.1
(``unirep-student/1``, ``unirep-dense-student/1``) load too.

Beside them, every export writes (each file atomically, the manifest last, so that a manifest
means a complete export):

- ``backbone/``: the shared backbone alone as a timm model, ``model.safetensors`` and timm's
  ``config.json`` (architecture, ``model_args``, ``pretrained_cfg`` with the preprocessing), so
  ``timm.create_model("local-dir:<student>/backbone", pretrained=True)`` or
  ``timm.create_model(<arch>, pretrained=True, num_classes=0, **model_args,
  pretrained_cfg_overlay=dict(file=<student>/backbone/model.safetensors, num_classes=0))`` gives
  the trained representation (:func:`timm_backbone` says which students have one: any timm
  backbone, ``resnet26_decathlon`` / ``resnet_decathlon_tiny`` and the dense ``segnet`` encoder
  as ``segnet_mtan``, the last three registered with timm by ``import unirep``; not a backbone
  with residual adapters, whose parts are per domain, nor a dense ``timm`` encoder, whose
  ``features_only`` wrapper renames the modules). The manifest's ``timm_backbone`` records it.
- ``README.md``: the model card (:mod:`unirep.pipeline.model_card`), when the caller renders one.

Exports written before the backbone and the card existed load as before.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from unirep.io import (
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    load_weights,
    read_json,
    save_weights,
)
from unirep.layout import BACKBONE as BACKBONE_DIR
from unirep.layout import MODEL_CARD, STUDENT_MANIFEST, TIMM_CONFIG, WEIGHTS
from unirep.models.build import build_network
from unirep.tasks import TASK_KINDS, Task
from unirep.version import __version__

STUDENT_FORMAT = "unirep-student/2"
SEGNET_TIMM_NAME = "segnet_mtan"
_OLD_DENSE_STREAM = "images"
# pretrained_cfg entries copied from the architecture's own timm config (how timm adapts it)
_TIMM_TRAITS = ("first_conv", "classifier", "fixed_input_size")


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
    card: Callable[[dict[str, Any]], str] | None = None,
) -> dict[str, Any]:
    """Write the student's weights, its timm backbone, its model card (``card(manifest)``, when
    given) and, last, its manifest, each atomically; returns the manifest."""
    directory = Path(directory)
    digest = save_weights(directory / WEIGHTS, net.state_dict())
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
        "timm_backbone": export_backbone(
            directory / BACKBONE_DIR, net, architecture, preprocessing
        ),
    }
    if card is not None:
        atomic_write_text(directory / MODEL_CARD, card(manifest))
    atomic_write_json(directory / STUDENT_MANIFEST, manifest)
    return manifest


def timm_backbone(
    net: nn.Module, arch: dict[str, Any]
) -> tuple[str, dict[str, Any], nn.Module] | str:
    """The student's shared backbone as timm builds it: ``(timm name, model arguments, a timm
    model holding the student's trained weights)``, or why there is none.

    Loadable: a classification student's backbone (any timm model, ``resnet26_decathlon``,
    ``resnet_decathlon_tiny``) without residual adapters, whose forward gives the pooled features
    ``[B, C]``; a dense student's ``segnet`` encoder as ``segnet_mtan``, whose
    ``forward_features`` gives the last stage ``[B, C_5, H/32, W/32]``. The weights are loaded
    strictly into a fresh ``timm.create_model(name, num_classes=0, **args)``, so the file is
    known to load there.
    """
    if "encoder" in arch:
        if arch["encoder"] != "segnet":
            return (
                f"dense encoder {arch['encoder']!r}: timm's features_only wrapper renames its "
                "modules, so its weights do not load into the plain timm model"
            )
        args = {"in_chans" if k == "in_channels" else k: v
                for k, v in arch.get("encoder_kwargs", {}).items()}  # fmt: skip
        model = timm.create_model(SEGNET_TIMM_NAME, pretrained=False, num_classes=0, **args)
        model.encoder.load_state_dict(net.trunk.state_dict(), strict=True)  # type: ignore[union-attr]
        return SEGNET_TIMM_NAME, args, model
    if arch.get("residual_adapters"):
        return "residual adapters: the backbone has per-domain parts, not one timm model"
    args = {k: v for k, v in arch.get("backbone_kwargs", {}).items() if k != "pretrained"}
    model = timm.create_model(arch["backbone"], pretrained=False, num_classes=0, **args)
    model.load_state_dict(net.trunk.state_dict(), strict=True)  # type: ignore[union-attr]
    return arch["backbone"], args, model


def timm_pretrained_cfg(
    model: nn.Module, preprocessing: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of an exported backbone, from the first stream's preprocessing
    (a multi-domain student normalises each domain with its own statistics: every stream's
    preprocessing is in ``config.json`` under ``unirep``)."""
    pre = next(iter(preprocessing.values()), {})
    cfg: dict[str, Any] = {"num_classes": 0, "interpolation": "bilinear"}
    if "crop" in pre:  # a Decathlon-style stream: resize, then a centre crop
        cfg.update(
            input_size=[3, pre["crop"], pre["crop"]],
            crop_pct=pre["crop"] / pre["resize"],
            crop_mode="squash" if pre.get("square_resize") else "center",
            mean=list(pre["mean"]),
            std=list(pre["std"]),
        )
    else:  # a dense stream: images as stored, in [0, 1], not normalised
        cfg.update(crop_pct=1.0, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
        if "image_size" in pre:
            cfg["input_size"] = [3, *pre["image_size"]]
    traits = getattr(model, "pretrained_cfg", None) or {}
    cfg.update({k: traits[k] for k in _TIMM_TRAITS if traits.get(k) is not None})
    return cfg


def export_backbone(
    directory: Path,
    net: nn.Module,
    arch: dict[str, Any],
    preprocessing: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Write ``directory/{model.safetensors, config.json}`` for timm (see :func:`timm_backbone`);
    returns the manifest's ``timm_backbone`` record (``folder`` None, with the reason, when the
    student has no timm backbone)."""
    found = timm_backbone(net, arch)
    if isinstance(found, str):
        return {"folder": None, "reason": found}
    name, args, model = found
    digest = save_weights(Path(directory) / WEIGHTS, model.state_dict())
    num_features = int(model.num_features)  # type: ignore[arg-type]
    config = {
        "architecture": name,
        "num_classes": 0,
        "num_features": num_features,
        "model_args": args,
        "pretrained_cfg": timm_pretrained_cfg(model, preprocessing),
        "unirep": {"preprocessing": preprocessing, "weights_sha256": digest},
    }
    atomic_write_json(Path(directory) / TIMM_CONFIG, config)
    return {
        "folder": BACKBONE_DIR,
        "architecture": name,
        "model_args": args,
        "num_features": num_features,
        "weights_sha256": digest,
    }


def read_student(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An exported student's manifest and weights, the weights checked against its hash."""
    directory = Path(directory)
    manifest = read_json(directory / STUDENT_MANIFEST, what="student manifest")
    weights = directory / WEIGHTS
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
