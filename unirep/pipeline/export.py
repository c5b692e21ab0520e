"""The exported student: ``student/model.safetensors`` + ``student/manifest.json``, one format.

The manifest records the architecture, every task (kind, stream, classes or output channels,
main metric), the preprocessing of each stream, the teachers the student was distilled from
(weights hashes, validation metrics), how it was selected (on validation) and the sha256 of the
weights. The alignment adapters, the objective's and the weighting's state are not exported.
:func:`load_student` rebuilds it strictly, checking the hash. Students written by unirep 0.1
(``unirep-student/1``, ``unirep-dense-student/1``) load too. A pruned student (DiSparse) is
``unirep-student/3``: its mostly-zero weights are stored packed (:func:`unirep.io.pack_sparse`:
the kept values and a bitmask; the manifest's ``packed`` lists them), so the file shrinks with
the sparsity, and they load back exactly.

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
  ``features_only`` wrapper renames the modules). A stock timm architecture loads so with timm
  alone. unirep's own ones have no stock timm equivalent (the decathlon ResNets' stride-1 stem,
  parameter-free shortcuts and final BN-ReLU are not timm's ``ResNet``; SegNet's bias-free,
  ``width_mult``-scaled stages are not timm's ``VGG``), so beside them goes
  :data:`TORCH_PROGRAM`, a ``torch.export`` program of the same weights that torch alone runs:
  ``torch.export.load("<student>/backbone/model.pt2").module()(x)`` gives what
  ``Student.features`` gives (:func:`export_program`). The manifest's ``timm_backbone`` records
  both (``program``: its file, sha256, input and output; None for a stock timm architecture).
- ``README.md``: the model card (:mod:`unirep.pipeline.model_card`), when the caller renders one.

Exports written before the backbone and the card existed load as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from unirep.errors import MissingFileError, StudentError
from unirep.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    load_weights,
    pack_sparse,
    read_record,
    save_weights,
    state_mismatch,
    unpack_sparse,
)
from unirep.layout import BACKBONE as BACKBONE_DIR
from unirep.layout import MODEL_CARD, STUDENT_MANIFEST, TIMM_CONFIG, TORCH_PROGRAM, WEIGHTS
from unirep.models.build import build_network
from unirep.tasks import TASK_KINDS, Task
from unirep.version import __version__

STUDENT_FORMAT = "unirep-student/2"
# the same with mostly-zero weights packed (a pruned student): "packed" lists them
STUDENT_FORMAT_PACKED = "unirep-student/3"
# the backbone as a torch.export program, beside TIMM_CONFIG in BACKBONE_DIR (for unirep.layout)
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
    state, packed = pack_sparse(net.state_dict())
    digest = save_weights(directory / WEIGHTS, state)
    manifest = {
        "format": STUDENT_FORMAT_PACKED if packed else STUDENT_FORMAT,
        "unirep_version": __version__,
        "preset": preset,
        "architecture": architecture,
        "feature_dim": int(net.feature_dim),  # type: ignore[arg-type]
        "tasks": {n: t.record() for n, t in tasks.items()},
        "preprocessing": preprocessing,
        "teachers": teacher_records(teachers),
        "selection": selection,
        "weights_sha256": digest,
        **({"packed": packed} if packed else {}),
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
        if arch.get("sharing") == "automtl":
            return (
                "AutoMTL student: each task runs its own branch of the encoder (shared, its own "
                "or skipped convolutions, its own batch norms), not one timm model"
            )
        if getattr(net, "trunk", None) is None:
            return "no shared encoder: every task picked its private one (SMTL-Lite)"
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
    if getattr(net, "trunk", None) is None:
        return "no shared backbone: every domain picked its private one (SMTL-Lite)"
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


def needs_program(name: str) -> bool:
    """Whether timm alone cannot build the architecture ``name``: it is registered outside timm
    (unirep's ``resnet26_decathlon``, ``resnet_decathlon_tiny``, ``segnet_mtan``)."""
    return not timm.models.model_entrypoint(name).__module__.startswith("timm.")


class _StudentFeatures(nn.Module):
    """A timm backbone's forward as ``Student.features``: the pooled ``[B, C]`` of a
    classification backbone, the last stage ``[B, C, h, w]`` (``forward_features``) of a dense
    encoder."""

    def __init__(self, model: nn.Module, dense: bool) -> None:
        super().__init__()
        self.model = model
        self.dense = dense

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x) if self.dense else self.model(x)  # type: ignore[operator]


def _size_oblivious() -> contextlib.AbstractContextManager[Any]:
    """Trace sizes 0/1 like any other (no guard such as ``W // 32 != 1``), so the program takes
    every batch and image size the model takes; a no-op where torch lacks the switch."""
    try:
        from torch.fx.experimental import _config

        return _config.patch(backed_size_oblivious=True)
    except (ImportError, AttributeError):  # pragma: no cover - other torch versions
        return contextlib.nullcontext()


def export_program(
    path: Path, model: nn.Module, *, dense: bool, input_size: list[int]
) -> dict[str, Any]:
    """Write ``model`` (eval mode) as a ``torch.export`` program to ``path``, atomically, and
    return its record: file name, sha256, input, output and the torch version that wrote it.

    The program's forward is what ``Student.features`` gives (see :class:`_StudentFeatures`),
    on float32 ``[B, C, H, W]`` preprocessed as the student's stream; batch and image size are
    dynamic (traced on ``[2, *input_size]``). It needs torch only:
    ``torch.export.load(path).module()(x)``. Checked on the trace input before writing.
    """
    module = _StudentFeatures(model.eval(), dense).eval()
    example = torch.zeros(2, *input_size)
    auto = torch.export.Dim.AUTO
    with _size_oblivious():
        program = torch.export.export(
            module, (example,), dynamic_shapes=({0: auto, 2: auto, 3: auto},)
        )
    with torch.no_grad():
        if not torch.allclose(program.module()(example), module(example), atol=1e-5):
            raise RuntimeError(f"the torch.export program of {path} differs from its model")
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(Path(path), data)
    c = int(model.num_features)  # type: ignore[arg-type]
    return {
        "file": Path(path).name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "input": f"float32 [B, {input_size[0]}, H, W], preprocessed as pretrained_cfg",
        "output": f"last stage [B, {c}, h, w]" if dense else f"pooled features [B, {c}]",
        "torch_version": torch.__version__,
    }


def export_backbone(
    directory: Path,
    net: nn.Module,
    arch: dict[str, Any],
    preprocessing: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Write ``directory/{model.safetensors, config.json}`` for timm (see :func:`timm_backbone`)
    and, for an architecture timm alone cannot build, ``directory/model.pt2`` for torch alone
    (:func:`export_program`); returns the manifest's ``timm_backbone`` record (``folder`` None,
    with the reason, when the student has no timm backbone)."""
    found = timm_backbone(net, arch)
    if isinstance(found, str):
        return {"folder": None, "reason": found}
    name, args, model = found
    directory = Path(directory)
    digest = save_weights(directory / WEIGHTS, model.state_dict())
    num_features = int(model.num_features)  # type: ignore[arg-type]
    pretrained_cfg = timm_pretrained_cfg(model, preprocessing)
    program = None
    if needs_program(name):
        default = getattr(model, "pretrained_cfg", None) or {}  # the architecture's own size
        size = pretrained_cfg.get("input_size") or default.get("input_size", (3, 224, 224))
        program = export_program(
            directory / TORCH_PROGRAM, model, dense="encoder" in arch, input_size=list(size)
        )
    config = {
        "architecture": name,
        "num_classes": 0,
        "num_features": num_features,
        "model_args": args,
        "pretrained_cfg": pretrained_cfg,
        "unirep": {"preprocessing": preprocessing, "weights_sha256": digest, "program": program},
    }
    atomic_write_json(directory / TIMM_CONFIG, config)
    return {
        "folder": BACKBONE_DIR,
        "architecture": name,
        "model_args": args,
        "num_features": num_features,
        "weights_sha256": digest,
        "program": program,
    }


STUDENT_FORMATS = (
    STUDENT_FORMAT_PACKED,
    STUDENT_FORMAT,
    "unirep-student/1",
    "unirep-dense-student/1",
)
"""The export formats this version reads (the current one and unirep 0.1's)."""
_RECOPY = "copy the whole student folder again (or rerun its run to export it again)"


def _student_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of the student in ``directory``, checked to be one this version reads: a
    :class:`MissingFileError` or :class:`StudentError` names the file and what to do."""
    path = directory / STUDENT_MANIFEST
    manifest = read_record(path, "student manifest", _RECOPY, StudentError)
    version = manifest.get("unirep_version", "an unknown version")
    if manifest.get("format") not in STUDENT_FORMATS:
        raise StudentError(
            f"student manifest {str(path)!r} has format {manifest.get('format')!r} (written by "
            f"unirep {version}), which unirep {__version__} does not read (it reads "
            f"{', '.join(STUDENT_FORMATS)}); load it with the unirep version that wrote it"
        )
    for key, kind in (("architecture", dict), ("tasks", dict), ("weights_sha256", str)):
        if not isinstance(manifest.get(key), kind) or not manifest[key]:
            raise StudentError(
                f"student manifest {str(path)!r} has no valid {key!r} entry; {_RECOPY}"
            )
    try:
        student_tasks(manifest)
        student_preprocessing(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StudentError(
            f"student manifest {str(path)!r} has a task or preprocessing record unirep "
            f"{__version__} does not read ({type(err).__name__}: {err}); {_RECOPY}"
        ) from None
    return manifest


def _check_fits(directory: Path, manifest: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """The weights are those of the architecture and tasks the manifest records: a renamed task,
    a changed class count or an unknown architecture is a :class:`StudentError` naming both
    files (never a partial load)."""
    where = str(directory / STUDENT_MANIFEST)
    try:
        expected = build_network(manifest["architecture"], student_tasks(manifest)).state_dict()
    except (KeyError, TypeError, ValueError) as err:  # e.g. a backbone this version lacks
        raise StudentError(
            f"student manifest {where!r} records an architecture unirep {__version__} cannot "
            f"build ({manifest['architecture']}: {err}); load it with the unirep version "
            "that wrote it"
        ) from None
    problems = state_mismatch(expected, state, "manifest")
    if problems:
        raise StudentError(
            f"student weights {str(directory / WEIGHTS)!r} do not fit the tasks and architecture "
            f"{where!r} records ({problems}): a task was renamed or its class count "
            f"changed in the manifest; restore the {STUDENT_MANIFEST} exported with these weights"
        )


def read_student(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An exported student's manifest and weights, the weights checked against its hash and
    against the architecture and tasks it records. Each fault (a missing or damaged file, a
    format or architecture this version does not read, edited tasks) is a one-line
    :class:`~unirep.errors.StudentError` / :class:`~unirep.errors.MissingFileError` naming the
    file and what to do."""
    directory = Path(directory)
    manifest = _student_manifest(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise MissingFileError(f"student weights {str(weights)!r} do not exist; {_RECOPY}")
    digest = file_sha256(weights)
    if digest != manifest["weights_sha256"]:
        raise StudentError(
            f"student weights {str(weights)!r} have sha256 {digest[:12]}…, but "
            f"{str(directory / STUDENT_MANIFEST)!r} records {manifest['weights_sha256'][:12]}…: "
            f"the file was replaced or corrupted; {_RECOPY}"
        )
    try:
        state = load_weights(weights)
    except ValueError as err:
        raise StudentError(f"{err}; {_RECOPY}") from None
    if manifest.get("packed"):  # a pruned student: its mostly-zero weights packed
        try:
            state = unpack_sparse(state, manifest["packed"])
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise StudentError(
                f"student weights {str(weights)!r} do not unpack as {STUDENT_MANIFEST} says "
                f"({type(err).__name__}: {err}); {_RECOPY}"
            ) from None
    _check_fits(directory, manifest, state)
    return manifest, state


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
    if "preprocessing" in manifest and manifest.get("format") in (
        STUDENT_FORMAT,
        STUDENT_FORMAT_PACKED,
    ):
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
