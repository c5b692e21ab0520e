"""One way to build any network of a run from an architecture record and the run's tasks.

An architecture record is the plain dict kept in teacher and student manifests: a multi-domain
classification network is ``{"backbone", "backbone_kwargs"[, "residual_adapters"]}``, a dense
multi-task network ``{"encoder", "encoder_kwargs", "decoder_channels"[, "cross_task",
"cross_task_kwargs"][, "sharing", "sharing_kwargs"]}`` (``sharing``: a student architecture of
:data:`~unirep.models.sharing.SHARING`, e.g. SMTL). Teachers use the record without the
student-only entries.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor, nn

from unirep.config.schema import Config
from unirep.models.backbones import build_backbone
from unirep.models.dense import build_dense_encoder, build_dense_from_architecture
from unirep.models.network import build_network as build_multi_domain
from unirep.models.sharing import CLASSIFICATION_SHARING, SHARING
from unirep.tasks import Task


def architecture(cfg: Config, student: bool = False) -> dict[str, Any]:
    """The record of the run's teacher (``student=False``) or student network."""
    if cfg.dense is not None:
        encoder = (student and cfg.dense.student_encoder) or cfg.dense.encoder
        arch: dict[str, Any] = {
            "encoder": encoder.name,
            "encoder_kwargs": dict(encoder.kwargs),
            "decoder_channels": cfg.dense.decoder_channels,
        }
        if student:
            cross = cfg.dense.cross_task
            arch["cross_task"] = cross.name if cross else None
            arch["cross_task_kwargs"] = dict(cross.kwargs) if cross else {}
            sharing = cfg.dense.sharing
            if sharing is not None:
                arch["sharing"] = sharing.name
                arch["sharing_kwargs"] = dict(sharing.kwargs)
                if sharing.name in ("smtl", "automtl", "disparse"):  # draws from the run seed
                    arch["sharing_kwargs"] = {"seed": cfg.seed, **sharing.kwargs}
        return arch
    spec = cfg.classification
    assert spec is not None
    arch = {"backbone": spec.backbone, "backbone_kwargs": dict(spec.backbone_kwargs)}
    if student:
        arch["residual_adapters"] = spec.residual_adapters
        if spec.sharing is not None:
            arch["sharing"] = spec.sharing.name
            arch["sharing_kwargs"] = dict(spec.sharing.kwargs)
            if spec.sharing.name == "smtl":  # the Lite gate's Gumbel draws follow the run seed
                arch["sharing_kwargs"] = {"seed": cfg.seed, **spec.sharing.kwargs}
    return arch


def build_network(
    arch: dict[str, Any],
    tasks: dict[str, Task],
    trunk_state: dict[str, Tensor] | None = None,
) -> nn.Module:
    """The network ``arch`` describes, with one head per task of ``tasks``.

    Every network has ``forward({stream: images}) -> {task: {"pred", "features", ...}}``,
    ``tasks``, ``trunk`` (the shared part), ``shared_parameters()``, ``feature_dim`` and
    ``build_aligners(teacher_dims)``. ``trunk_state`` initialises the shared part (strictly),
    e.g. from a teacher.
    """
    if "encoder" in arch:
        if trunk_state is not None:
            raise ValueError("dense networks are not initialised from a teacher's trunk")
        unit = [n for n, t in tasks.items() if t.kind.unit_vector]
        return build_dense(arch, {n: t.out_channels for n, t in tasks.items()}, unit)
    if arch.get("sharing"):
        return CLASSIFICATION_SHARING.build(
            arch["sharing"],
            backbone=partial(build_backbone, arch["backbone"], **arch.get("backbone_kwargs", {})),
            num_classes={n: t.out_channels for n, t in tasks.items()},
            backbone_state=trunk_state,
            **dict(arch.get("sharing_kwargs") or {}),
        )
    return build_multi_domain(
        arch["backbone"],
        dict(arch.get("backbone_kwargs", {})),
        {n: t.out_channels for n, t in tasks.items()},
        residual_adapters=bool(arch.get("residual_adapters", False)),
        backbone_state=trunk_state,
    )


def build_dense(
    arch: dict[str, Any], channels: dict[str, int], unit_vector: list[str]
) -> nn.Module:
    """The dense network of ``arch`` with ``{task: output channels}``: the shared-encoder
    :class:`~unirep.models.dense.DenseMultiTaskNet`, or the :data:`~unirep.models.sharing.SHARING`
    entry ``arch["sharing"]`` names (built with ``arch["sharing_kwargs"]``)."""
    sharing = arch.get("sharing")
    if not sharing:
        return build_dense_from_architecture(arch, channels, unit_vector=unit_vector)
    if arch.get("cross_task"):
        raise ValueError(f"a {sharing!r} student has no cross-task module")
    return SHARING.build(
        sharing,
        encoder=partial(build_dense_encoder, arch["encoder"], **arch.get("encoder_kwargs", {})),
        tasks=channels,
        decoder_channels=arch["decoder_channels"],
        unit_vector=unit_vector,
        **dict(arch.get("sharing_kwargs") or {}),
    )


def exported(net: nn.Module, arch: dict[str, Any]) -> tuple[dict[str, Any], nn.Module]:
    """(architecture record, network) a trained student is exported as: the network itself, or
    what its ``exported`` method makes of it (SMTL-Lite drops the encoders no task picked)."""
    make = getattr(net, "exported", None)
    return make(arch) if make is not None else (arch, net)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
