"""Checks every registry name a config uses, before any data is read or model built."""

from __future__ import annotations

from typing import TYPE_CHECKING

from unirep.registry import Registry

if TYPE_CHECKING:
    from unirep.config import Config


def _check(registry: Registry, name: str, key: str) -> None:
    from unirep.config import ConfigError

    if name not in registry:
        raise ConfigError(
            f"config key {key!r}: unknown {registry.kind} {name!r}; "
            f"valid choices: {', '.join(registry.names())}"
        )


def check_names(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the key for any unknown component name."""
    from unirep.config import ConfigError
    from unirep.data.sources import DATA_SOURCES
    from unirep.losses import FEATURE_LOSSES, PREDICTION_LOSSES, TASK_LOSSES
    from unirep.models.adapters import ADAPTERS
    from unirep.models.backbones import is_backbone
    from unirep.optim import OPTIMIZERS, SCHEDULES

    if cfg.dense is not None:
        _check_dense(cfg)
    else:
        _check(DATA_SOURCES, cfg.data.source, "data.source")
    _check(ADAPTERS, cfg.model.adapter.name, "model.adapter.name")
    _check(TASK_LOSSES, cfg.distill.task_loss.name, "distill.task_loss.name")
    _check(FEATURE_LOSSES, cfg.distill.feature_loss.name, "distill.feature_loss.name")
    _check(PREDICTION_LOSSES, cfg.distill.prediction_loss.name, "distill.prediction_loss.name")
    trains = {"train": cfg.train, "teachers.train": cfg.teachers.train}
    if cfg.teachers.finetune_train is not None:
        trains["teachers.finetune_train"] = cfg.teachers.finetune_train
    for prefix, train in trains.items():
        for part in ("optim", "adapter_optim"):
            spec = getattr(train, part)
            _check(OPTIMIZERS, spec.optimizer.name, f"{prefix}.{part}.optimizer.name")
            _check(SCHEDULES, spec.scheduler.name, f"{prefix}.{part}.scheduler.name")
    if not is_backbone(cfg.model.backbone):
        raise ConfigError(
            f"config key 'model.backbone': unknown backbone {cfg.model.backbone!r}; valid choices: "
            "any name in timm.list_models(), e.g. resnet26_decathlon, resnet_decathlon_tiny, "
            "resnet18"
        )


def _check_dense(cfg: Config) -> None:
    from unirep.config import ConfigError
    from unirep.data.dense_sets import DENSE_SOURCES
    from unirep.losses import PREDICTION_LOSSES, TASK_LOSSES
    from unirep.models.cross_task import CROSS_TASK
    from unirep.models.dense import DENSE_ENCODERS

    dense = cfg.dense
    assert dense is not None
    if cfg.data.source not in DENSE_SOURCES:
        raise ConfigError(
            f"config key 'data.source': {cfg.data.source!r} is not a dense data source; valid "
            f"choices with a 'dense' section: {', '.join(DENSE_SOURCES)}"
        )
    _check(DENSE_ENCODERS, dense.encoder.name, "dense.encoder.name")
    if dense.cross_task is not None:
        _check(CROSS_TASK, dense.cross_task.name, "dense.cross_task.name")
    for task, spec in dense.tasks.items():
        _check(TASK_LOSSES, spec.loss.name, f"dense.tasks.{task}.loss.name")
        if spec.prediction_loss is not None:
            _check(
                PREDICTION_LOSSES,
                spec.prediction_loss.name,
                f"dense.tasks.{task}.prediction_loss.name",
            )
