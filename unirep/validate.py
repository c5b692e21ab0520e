"""Every check of a config's values, run before any data is read or model built.

:mod:`unirep.config` holds the schema and reads YAML (keys and types); this module holds the rest,
in one place: value choices, ranges, cross-field rules, keys that do not apply to the run's kind,
and registry names. It sits above both the schema and the registries (which import the schema
for its dataclasses), so imports point one way. ``load_config`` (read + validate) is the entry
point of every script. Errors are :class:`~unirep.config.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from unirep.config import Config, ConfigError, ModelConfig, read_config
from unirep.data.decathlon import ON_CORRUPT_CHOICES
from unirep.data.dense import DENSE_TASKS, DEPTH_KINDS
from unirep.data.dense_sets import DENSE_SOURCES
from unirep.data.sources import DATA_SOURCES
from unirep.losses import FEATURE_LOSSES, PREDICTION_LOSSES, TASK_LOSSES
from unirep.models.adapters import ADAPTERS
from unirep.models.backbones import is_backbone
from unirep.models.cross_task import CROSS_TASK
from unirep.models.dense import DENSE_ENCODERS
from unirep.optim import OPTIMIZERS, SCHEDULES
from unirep.registry import Registry
from unirep.weighting import WEIGHTINGS

__all__ = ["CHOICES", "NOT_FOR_DENSE", "load_config", "validate"]

CHOICES: dict[str, tuple[str, ...]] = {
    "split": ("train", "val", "test"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "data.on_corrupt": ON_CORRUPT_CHOICES,
    "distill.annealing": ("linear", "none"),
    "train.selection_metric": ("accuracy", "delta_m"),
}

_DENSE_IMAGES = (
    "dense images keep their stored size; their augmentation is 'dense.scales', 'dense.flip' "
    "and 'dense.augment'"
)
_DENSE_TEACHERS = "each dense teacher is trained from scratch with 'teachers.train'"
NOT_FOR_DENSE: dict[str, str] = {
    **{
        f"model.{f.name}": "the dense network is set by 'dense.encoder', 'dense.decoder_channels' "
        "and 'dense.cross_task'"
        for f in dataclasses.fields(ModelConfig)
    },
    "distill.task_loss": "set each task's loss in 'dense.tasks.<task>.loss'",
    "distill.prediction_loss": "set it per task in 'dense.tasks.<task>.prediction_loss'",
    "distill.init_from_teacher": "the dense student is trained from scratch (as in URL on NYUv2)",
    "data.resize": _DENSE_IMAGES,
    "data.crop": _DENSE_IMAGES,
    "data.crops": _DENSE_IMAGES,
    "data.square_resize": _DENSE_IMAGES,
    "data.no_flip": "flipping is switched by 'dense.flip'",
    "data.domains": "a dense run's tasks are the keys of 'dense.tasks'",
    "data.batch_sizes": "set 'data.batch_size' (one batch holds every task)",
    "data.hf_domains": f"dense data comes from 'data.source' ({' or '.join(DENSE_SOURCES)})",
    "teachers.finetune_from": _DENSE_TEACHERS,
    "teachers.finetune_train": _DENSE_TEACHERS,
    "teachers.finetune_lr": _DENSE_TEACHERS,
}
"""Keys a dense run refuses unless they keep their default, and what to do instead."""

_TEACHER_SELECTION = (
    "teachers always select on their task's main metric on the validation split; remove it "
    "(train.selection_metric chooses the student's)"
)


def load_config(preset_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a preset name or YAML path (default ``mini-decathlon``), apply overrides, validate."""
    cfg = read_config(preset_or_path, overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError`, naming the key, for the first value that cannot work."""
    _check_choices(cfg)
    _check_keys_apply(cfg)
    _check_ranges(cfg)
    if cfg.dense is not None:
        _check_dense(cfg)
    else:
        _check_classification(cfg)
    _check_common_names(cfg)


# --------------------------------------------------------------------------------------------
# Values, ranges, keys of the other kind


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _kind(cfg: Config) -> str:
    return "dense" if cfg.dense is not None else "classification"


def _check_choices(cfg: Config) -> None:
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(
                f"config key {key!r}: {value!r} is not valid; choices: {', '.join(choices)}"
            )


def _check_keys_apply(cfg: Config) -> None:
    """Refuse keys the run's kind would silently ignore.

    A key that keeps its dataclass default is accepted, so that the fully resolved config.yaml
    saved with every run loads again.
    """
    defaults = Config()
    if cfg.dense is not None:
        for key, instead in NOT_FOR_DENSE.items():
            value = _get(cfg, key)
            if value != _get(defaults, key):
                raise ConfigError(
                    f"config key {key!r} does not apply to dense runs (a 'dense' section is set)"
                    f"{_shown(value)}: {instead}; remove the key"
                )
    teacher_recipes = {"teachers.train": cfg.teachers.train}
    if cfg.teachers.finetune_train is not None:
        teacher_recipes["teachers.finetune_train"] = cfg.teachers.finetune_train
    for prefix, recipe in teacher_recipes.items():
        if recipe.selection_metric != defaults.teachers.train.selection_metric:
            raise ConfigError(
                f"config key '{prefix}.selection_metric' does not apply to {_kind(cfg)} runs, "
                f"got {recipe.selection_metric!r}: {_TEACHER_SELECTION}"
            )


def _shown(value: Any) -> str:
    """``, got <value>`` for short values; sections and specs are named by their key alone."""
    return f", got {value!r}" if isinstance(value, str | int | float | list) else ""


def _check_ranges(cfg: Config) -> None:
    for key in (
        "train.max_steps",
        "teachers.train.max_steps",
        "data.batch_size",
        "data.eval_batch_size",
        "data.crop",
        "data.resize",
    ):
        value = _get(cfg, key)
        if value <= 0:
            raise ConfigError(f"config key {key!r}: must be positive, got {value}")


# --------------------------------------------------------------------------------------------
# Each kind's cross-field rules and registry names


def _check_classification(cfg: Config) -> None:
    crops = {"data.crop": cfg.data.crop}
    crops.update({f"data.crops.{d}": c for d, c in cfg.data.crops.items()})
    for key, crop in crops.items():
        if not 0 < crop <= cfg.data.resize:
            raise ConfigError(
                f"config key {key!r} ({crop}) must be positive and not exceed 'data.resize' "
                f"({cfg.data.resize})"
            )
    if cfg.train.selection_metric != "accuracy":
        raise ConfigError(
            "config key 'train.selection_metric': 'delta_m' is for dense runs (a 'dense' section); "
            "classification selects on 'accuracy'"
        )
    _check(DATA_SOURCES, cfg.data.source, "data.source")
    _check(ADAPTERS, cfg.model.adapter.name, "model.adapter.name")
    _check(TASK_LOSSES, cfg.distill.task_loss.name, "distill.task_loss.name")
    _check(PREDICTION_LOSSES, cfg.distill.prediction_loss.name, "distill.prediction_loss.name")
    if not is_backbone(cfg.model.backbone):
        raise ConfigError(
            f"config key 'model.backbone': unknown backbone {cfg.model.backbone!r}; valid choices: "
            "any name in timm.list_models(), e.g. resnet26_decathlon, resnet_decathlon_tiny, "
            "resnet18"
        )


def _check_dense(cfg: Config) -> None:
    dense = cfg.dense
    assert dense is not None
    if not dense.tasks:
        raise ConfigError(
            f"config key 'dense.tasks': name at least one of {', '.join(DENSE_TASKS)}"
        )
    kinds = set()
    for task, spec in dense.tasks.items():
        if spec.kind is not None and spec.kind not in DENSE_TASKS:
            raise ConfigError(
                f"config key 'dense.tasks.{task}.kind': unknown dense task kind {spec.kind!r}; "
                f"valid choices: {', '.join(DENSE_TASKS)}"
            )
        if spec.kind is None and task not in DENSE_TASKS:
            raise ConfigError(
                f"config key 'dense.tasks.{task}': unknown dense task; name it one of "
                f"{', '.join(DENSE_TASKS)}, or set 'dense.tasks.{task}.kind' to one of them"
            )
        kinds.add(spec.kind or task)  # None: the name is the kind
    if dense.depth_kind not in DEPTH_KINDS:
        raise ConfigError(
            f"config key 'dense.depth_kind': {dense.depth_kind!r} is not valid; choices: "
            f"{', '.join(DEPTH_KINDS)}"
        )
    if "semantic" in kinds and dense.num_classes < 2:
        raise ConfigError(f"config key 'dense.num_classes': must be >= 2, got {dense.num_classes}")
    if not dense.scales or any(s < 1.0 for s in dense.scales):
        raise ConfigError(
            f"config key 'dense.scales': zoom factors >= 1.0 expected, got {dense.scales}"
        )
    if dense.val_folder is None and not 0.0 < dense.val_fraction < 1.0:
        raise ConfigError(
            f"config key 'dense.val_fraction': must be in (0, 1), got {dense.val_fraction}"
        )
    if dense.decoder_channels <= 0:
        raise ConfigError(
            f"config key 'dense.decoder_channels': must be positive, got {dense.decoder_channels}"
        )
    if cfg.train.selection_metric != "delta_m":
        raise ConfigError(
            "config key 'train.selection_metric': dense runs select on 'delta_m' (Δm against the "
            f"teachers on the validation split), got {cfg.train.selection_metric!r}"
        )
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


def _check_common_names(cfg: Config) -> None:
    _check(FEATURE_LOSSES, cfg.distill.feature_loss.name, "distill.feature_loss.name")
    _check(WEIGHTINGS, cfg.weighting.name, "weighting.name")
    trains = {"train": cfg.train, "teachers.train": cfg.teachers.train}
    if cfg.teachers.finetune_train is not None:
        trains["teachers.finetune_train"] = cfg.teachers.finetune_train
    for prefix, train in trains.items():
        for part in ("optim", "adapter_optim"):
            spec = getattr(train, part)
            _check(OPTIMIZERS, spec.optimizer.name, f"{prefix}.{part}.optimizer.name")
            _check(SCHEDULES, spec.scheduler.name, f"{prefix}.{part}.scheduler.name")


def _check(registry: Registry, name: str, key: str) -> None:
    if name not in registry:
        raise ConfigError(
            f"config key {key!r}: unknown {registry.kind} {name!r}; "
            f"valid choices: {', '.join(registry.names())}"
        )
