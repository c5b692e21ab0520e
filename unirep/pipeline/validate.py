"""Every check of a config's values, run before any data is read or model built.

:mod:`unirep.config.schema` holds the schema and reads YAML (keys and types); this module holds the rest,
in one place: value choices, ranges (sizes, intervals, steps, rates, weights), cross-field rules,
keys that do not apply to the run's kind, registry names, every component's keyword arguments
(against its registered builder's signature, then by building it where that is cheap), loss
names against task kinds, and per-task keys against the run's tasks. It sits above both the
schema and the registries (which import the schema for its dataclasses), so imports point one
way. ``load_config`` (read + validate) is the entry point of every script. What only the data can
tell (split sizes against batch sizes, the domains of a source when ``data.domains`` is empty) is
checked by :func:`check_against_data` as soon as the data is resolved, still before any work.
Errors are :class:`~unirep.config.schema.ConfigError` naming the key, the value and what is valid.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from unirep.config.schema import (
    OUTPUT_CACHE_DTYPES,
    Config,
    ConfigError,
    ModelConfig,
    OptimConfig,
    Spec,
    TrainConfig,
    apply_override,
    cache_dir,
    from_dict,
    read_config,
    to_dict,
)
from unirep.data.classification.decathlon import ON_CORRUPT_CHOICES
from unirep.data.classification.mini_decathlon import ensure_mini_decathlon
from unirep.data.classification.sources import DATA_SOURCES
from unirep.data.dense.mini_scenes import ensure_mini_scenes
from unirep.data.dense.mtan import DENSE_TASKS, DEPTH_KINDS
from unirep.data.dense.sources import DENSE_SOURCES
from unirep.losses import FEATURE_LOSSES, PREDICTION_LOSSES, TASK_LOSSES
from unirep.models.adapters import ADAPTERS
from unirep.models.backbones import is_backbone
from unirep.models.cross_task import CROSS_TASK
from unirep.models.dense import DENSE_ENCODERS
from unirep.optim.optimizers import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler
from unirep.registry import Registry
from unirep.tasks import TASK_KINDS
from unirep.teachers.batched import teacher_autocast_dtype
from unirep.training.tracking import LOG_WITH, tracker_names
from unirep.weighting import WEIGHTINGS

if TYPE_CHECKING:
    from unirep.data.streams import RunData

__all__ = ["CHOICES", "NOT_FOR_DENSE", "check_against_data", "load_config", "validate"]

CHOICES: dict[str, tuple[str, ...]] = {
    "split": ("train", "val", "test"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "log_with": LOG_WITH,
    "data.on_corrupt": ON_CORRUPT_CHOICES,
    "distill.annealing": ("linear", "none"),
    "train.selection_metric": ("accuracy", "delta_m"),
    "train.on_nonfinite": ("stop", "skip"),  # also each teacher recipe's (checked with it)
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
    tracker_names(cfg.log_with)  # the tracker's package is installed
    _check_keys_apply(cfg)
    if cfg.dense is not None and cfg.data.source not in DENSE_SOURCES:  # before its kwargs
        raise ConfigError(
            f"config key 'data.source': {cfg.data.source!r} is not a dense data source; valid "
            f"choices with a 'dense' section: {', '.join(DENSE_SOURCES)}"
        )
    _check_run(cfg)
    _check_speed(cfg)
    _check_ranges(cfg)
    for prefix, recipe in _recipes(cfg).items():
        _check_recipe(prefix, recipe)
    _check_weights(cfg)
    if cfg.dense is not None:
        _check_dense(cfg)
    else:
        _check_classification(cfg)
    _check_partial(cfg)
    _check_xtask(cfg)
    _check_common_names(cfg)
    _check_common_kwargs(cfg)
    _check_task_keys(cfg, *_known_tasks(cfg))


def check_against_data(cfg: Config, data: RunData, world_size: int = 1) -> None:
    """What the config says against what the data holds, before any training.

    Every stream's training split must hold at least one batch of every process
    (``batch · world_size`` samples; the key named is ``data.batch_sizes.<domain>`` when it sets
    the stream's batch, else ``data.batch_size``). When ``data.domains`` is empty the run's tasks
    are every domain of the source, known only now: each per-task key must name one of them. When
    ``data.domains`` picks some domains, a per-domain setting may also name another domain of the
    source (a preset describes the whole benchmark), but a typo is refused.
    """
    tasks = list(data.tasks())
    if cfg.dense is None:
        everything = _source_domains(cfg) if cfg.data.domains else tasks
        _check_task_keys(cfg, tasks, everything)
    _check_weighting_build(cfg, tasks)
    sizes = data.batch_sizes()
    for stream, dataset in data.datasets("train", train=True).items():
        available = len(dataset)  # type: ignore[arg-type]
        batch = sizes[stream]
        if batch * world_size > available:
            key = (
                f"data.batch_sizes.{stream}"
                if stream in cfg.data.batch_sizes
                else "data.batch_size"
            )
            processes = f" × {world_size} processes" if world_size > 1 else ""
            raise ConfigError(
                f"config key {key!r}: a training batch of {batch} per process{processes} exceeds "
                f"the {available} training samples of {stream!r}; valid: at most "
                f"{available // world_size}"
            )
    if cfg.dense is not None and cfg.partial.protocol != "full":
        batch = sizes[next(iter(sizes))]
        for task in tasks:  # each teacher trains on the images labelled for its task
            labelled = len(data.labelled_train_set(task))  # type: ignore[arg-type]
            if batch * world_size > labelled:
                raise ConfigError(
                    f"config key 'data.batch_size': the teacher of {task!r} trains on the "
                    f"{labelled} training images labelled for it (partial.protocol="
                    f"{cfg.partial.protocol}), fewer than a batch of {batch * world_size}; valid: "
                    f"at most {labelled // world_size}"
                )


def resolve_config(
    config: Config | str | Path | None = None, overrides: Sequence[str] = ()
) -> Config:
    """A checked config from Python: ``config`` is a :class:`Config`, a preset name or a YAML
    path (None: the default preset), with dotted ``key=value`` ``overrides`` applied, as
    ``--config`` and the overrides do on the command line. A :class:`Config` is copied, not
    changed. Bad keys, types and values raise :class:`ConfigError` naming the key."""
    if isinstance(config, Config):
        values = to_dict(config)
        for override in overrides:
            apply_override(values, override)
        cfg = from_dict(Config, values)
    else:
        cfg = read_config(None if config is None else str(config), list(overrides))
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# Values, ranges, keys of the other kind


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _kind(cfg: Config) -> str:
    return "dense" if cfg.dense is not None else "classification"


def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: must be {valid}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _at_least_one(key: str, value: int) -> None:
    _require(value >= 1, key, value, "a positive integer (>= 1)")


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
    if cfg.teachers.finetune_lr and cfg.teachers.finetune_from is None:
        raise ConfigError(
            "config key 'teachers.finetune_lr' has no effect without 'teachers.finetune_from' "
            "(the teacher whose trunk initialises the others); set it or remove the key"
        )
    source = cfg.teachers.finetune_from
    if source is not None and source in cfg.teachers.finetune_lr:
        raise ConfigError(
            f"config key 'teachers.finetune_lr.{source}': {source!r} is teachers.finetune_from, "
            "trained from scratch with teachers.train (set its lr in "
            "teachers.train.optim.optimizer.kwargs.lr); remove the key"
        )


def _shown(value: Any) -> str:
    """``, got <value>`` for short values; sections and specs are named by their key alone."""
    return f", got {value!r}" if isinstance(value, str | int | float | list) else ""


def _check_run(cfg: Config) -> None:
    """The run as a whole: seed, run folder, device."""
    _require(0 <= cfg.seed < 2**32, "seed", cfg.seed, "an integer in [0, 2**32)")
    if cfg.overwrite and cfg.resume:
        resume = "true" if cfg.resume is True else repr(cfg.resume)
        raise ConfigError(
            f"config key 'overwrite': true cannot be combined with resume={resume}: resume "
            "continues the run folder, overwrite deletes it; set one of them"
        )
    on_cpu = cfg.cpu or not torch.cuda.is_available()
    if cfg.mixed_precision == "fp16" and on_cpu:
        reason = "cpu=true" if cfg.cpu else "no CUDA device is available"
        raise ConfigError(
            f"config key 'mixed_precision': 'fp16' needs a CUDA GPU, but this run is on CPU "
            f"({reason}); valid on CPU: bf16 or no"
        )


def _device_type(cfg: Config) -> str:
    """Where the run goes (as :func:`unirep.pipeline.rundir.make_accelerator` decides)."""
    return "cpu" if cfg.cpu or not torch.cuda.is_available() else "cuda"


def _check_speed(cfg: Config) -> None:
    """``teachers.autocast`` against the device; ``*.compile`` only where torch.compile works
    (checked once, here, rather than failing at the first step of a phase)."""
    device = torch.device(_device_type(cfg))
    teacher_autocast_dtype(cfg.teachers.autocast, device)
    cache = cfg.teachers.output_cache
    _require(
        isinstance(cache.draws, int) and not isinstance(cache.draws, bool) and cache.draws >= 0,
        "teachers.output_cache.draws", cache.draws, "an integer >= 0 (0: teachers run online)",
    )  # fmt: skip
    _require(cache.dtype in OUTPUT_CACHE_DTYPES, "teachers.output_cache.dtype", cache.dtype,
             " or ".join(OUTPUT_CACHE_DTYPES))  # fmt: skip
    keys = [f"{prefix}.compile" for prefix, recipe in _recipes(cfg).items() if recipe.compile]
    if keys:
        problem = _compile_problem(device.type)
        if problem is not None:
            raise ConfigError(
                f"config key {keys[0]!r}: torch.compile does not work on this {device.type} "
                f"machine ({problem}); set {keys[0]}=false"
            )


def _compile_problem(device_type: str) -> str | None:
    """Why torch.compile cannot run on ``device_type`` here, or None. On CUDA, Inductor needs
    Triton; on CPU it compiles C++, so a tiny function is compiled to find out."""
    if device_type == "cuda":
        import importlib.util

        return None if importlib.util.find_spec("triton") else "the triton package is missing"
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2))
    except Exception as err:  # any failure means: not usable here
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]
    return None


def _check_ranges(cfg: Config) -> None:
    data = cfg.data
    sizes = {
        "data.batch_size": data.batch_size,
        "data.eval_batch_size": data.eval_batch_size,
        "data.crop": data.crop,
        "data.resize": data.resize,
        **{f"data.batch_sizes.{d}": b for d, b in data.batch_sizes.items()},
        **{f"data.crops.{d}": c for d, c in data.crops.items()},
    }
    for key, value in sizes.items():
        _at_least_one(key, value)
    _require(data.num_workers >= 0, "data.num_workers", data.num_workers, "an integer >= 0")
    _require(
        _finite(data.memory_cache_mib) and data.memory_cache_mib >= 0,
        "data.memory_cache_mib",
        data.memory_cache_mib,
        "a size in MiB >= 0 (0: off)",
    )
    generator = _GENERATORS.get(data.source)
    if generator is not None:
        _check_arguments(
            generator, data.generator, "data.generator", f"the {data.source} generator", ("root",)
        )


def _recipes(cfg: Config) -> dict[str, TrainConfig]:
    """Every training recipe of the run, by its key."""
    recipes = {"train": cfg.train, "teachers.train": cfg.teachers.train}
    if cfg.teachers.finetune_train is not None:
        recipes["teachers.finetune_train"] = cfg.teachers.finetune_train
    return recipes


def _check_recipe(prefix: str, recipe: TrainConfig) -> None:
    """Lengths, intervals and the non-finite policy of one training recipe."""
    for name in (
        "max_steps",
        "gradient_accumulation_steps",
        "eval_every",
        "checkpoint_every",
        "log_every",
        "keep_checkpoints",
    ):
        _at_least_one(f"{prefix}.{name}", getattr(recipe, name))
    every = recipe.diagnostics_every
    _require(
        isinstance(every, int) and not isinstance(every, bool) and every >= 0,
        f"{prefix}.diagnostics_every",
        every,
        "an integer >= 0 (0: off)",
    )
    clip = recipe.grad_clip
    _require(
        clip is None or (_finite(clip) and clip > 0),
        f"{prefix}.grad_clip",
        clip,
        "a positive number, or null for no clipping",
    )
    choices = CHOICES["train.on_nonfinite"]
    if recipe.on_nonfinite not in choices:
        raise ConfigError(
            f"config key '{prefix}.on_nonfinite': {recipe.on_nonfinite!r} is not valid; "
            f"choices: {', '.join(choices)}"
        )


def _check_weights(cfg: Config) -> None:
    """λs, scales and task weights are finite and >= 0; per-task learning rates are > 0."""
    distill = cfg.distill
    weights: dict[str, float] = {
        "distill.default_lambda": distill.default_lambda,
        "distill.feature_scale": distill.feature_scale,
        "distill.prediction_scale": distill.prediction_scale,
        "distill.contrastive_weight": distill.contrastive_weight,
        **{f"distill.lambda_feature.{t}": v for t, v in distill.lambda_feature.items()},
        **{f"distill.lambda_prediction.{t}": v for t, v in distill.lambda_prediction.items()},
    }
    if cfg.dense is not None:
        weights.update({f"dense.tasks.{t}.weight": s.weight for t, s in cfg.dense.tasks.items()})
    for key, value in weights.items():
        _require(_finite(value) and value >= 0, key, value, "a finite number >= 0")
    _require(_finite(distill.contrastive_temperature) and distill.contrastive_temperature > 0,
             "distill.contrastive_temperature", distill.contrastive_temperature,
             "a finite number > 0")  # fmt: skip
    for task, lr in cfg.teachers.finetune_lr.items():
        key = f"teachers.finetune_lr.{task}"
        _require(_finite(lr) and lr > 0, key, lr, "a positive learning rate")


def _dense_only(key: str, changed: bool, why: str) -> None:
    """Refuse a section of dense runs that a classification run sets."""
    if changed:
        raise ConfigError(f"config key {key!r}: {why}")


def _check_xtask(cfg: Config) -> None:
    """Cross-task terms: dense runs with 2+ tasks; weights, ramp-ups, pairs and settings."""
    from unirep.config.schema import XTASK_TERMS, CrossTaskConfig

    x = cfg.xtask
    if cfg.dense is None:
        _dense_only("xtask", x != CrossTaskConfig(), "cross-task terms map one dense task's "
                    "prediction to another's; they need a 'dense' section")  # fmt: skip
        return
    for name in XTASK_TERMS:
        term = getattr(x, name)
        _require(_finite(term.weight) and term.weight >= 0, f"xtask.{name}.weight", term.weight,
                 "a finite number >= 0 (0: off)")  # fmt: skip
        _require(term.rampup_steps >= 0, f"xtask.{name}.rampup_steps", term.rampup_steps,
                 "an integer >= 0")  # fmt: skip
    _require(x.class_distance in ("kl", "ce"), "xtask.class_distance",
             x.class_distance, "kl or ce")  # fmt: skip
    _require(_finite(x.temperature) and x.temperature > 0, "xtask.temperature", x.temperature,
             "a finite number > 0")  # fmt: skip
    _require(x.embed_dim >= 1, "xtask.embed_dim", x.embed_dim, "a positive integer")
    _require(bool(x.widths) and all(w >= 1 for w in x.widths), "xtask.widths", x.widths,
             "a non-empty list of positive channel counts")  # fmt: skip
    tasks = list(cfg.dense.tasks)
    if x.active() and len(tasks) < 2:
        raise ConfigError("config key 'xtask': cross-task terms need 2+ dense tasks")
    pairs = [tuple(p) for p in x.pairs] if x.pairs is not None else None
    for pair in pairs or []:
        if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(tasks):
            raise ConfigError(
                f"config key 'xtask.pairs': {list(pair)!r} is not an ordered pair of two "
                f"different tasks of this run ({', '.join(tasks)})"
            )
    if pairs is not None and len(set(pairs)) != len(pairs):
        raise ConfigError("config key 'xtask.pairs': a pair appears twice")
    if pairs is not None and not pairs:
        raise ConfigError("config key 'xtask.pairs': empty; leave it null for every pair")
    if x.cycle.weight > 0 and pairs is not None and not any((b, a) in pairs for a, b in pairs):
        raise ConfigError(
            "config key 'xtask.cycle.weight': a cycle a→b→a needs both (a, b) and (b, a) in "
            "xtask.pairs"
        )


def _check_partial(cfg: Config) -> None:
    """Partially labelled data: dense runs only; protocol, file, fractions, method settings."""
    from unirep.config.schema import PartialConfig
    from unirep.data.dense.label_splits import PROTOCOLS

    part = cfg.partial
    if cfg.dense is None:
        _dense_only("partial", part != PartialConfig(), "partially labelled training data is "
                    "for dense runs (a 'dense' section); classification domains are labelled per "
                    "image")  # fmt: skip
        return
    _require(part.protocol in PROTOCOLS, "partial.protocol", part.protocol,
             f"one of {', '.join(PROTOCOLS)}")  # fmt: skip
    _require(part.method in PARTIAL_METHODS, "partial.method", part.method,
             f"one of {', '.join(PARTIAL_METHODS)}")  # fmt: skip
    _require(part.mtpsl.mode in ("partial", "full"), "partial.mtpsl.mode", part.mtpsl.mode,
             "partial or full")  # fmt: skip
    if part.protocol == "file":
        if not part.file:
            raise ConfigError("config key 'partial.file': protocol 'file' needs a split file")
        if not Path(part.file).expanduser().is_file():
            raise ConfigError(f"config key 'partial.file': {part.file!r} does not exist")
    elif part.file:
        raise ConfigError(
            f"config key 'partial.file' is only read with partial.protocol=file "
            f"(protocol is {part.protocol!r})"
        )
    fractions = {"partial.fraction": part.fraction}
    fractions.update({f"partial.fractions.{t}": f for t, f in part.fractions.items()})
    for key, value in fractions.items():
        _require(_finite(value) and 0 <= value <= 1, key, value, "a fraction in [0, 1]")
    tasks = list(cfg.dense.tasks)
    for key, names in (("partial.fractions", part.fractions), ("partial.file_tasks",
                                                                part.file_tasks)):  # fmt: skip
        unknown = [t for t in names if t not in tasks]
        if unknown:
            raise ConfigError(
                f"config key {key!r} names {', '.join(map(repr, unknown))}, not a task of this "
                f"run ({', '.join(tasks)})"
            )
    if part.protocol == "random-labels" and len(tasks) < 2:
        raise ConfigError(
            "config key 'partial.protocol': random-labels needs at least 2 tasks (a non-empty, "
            "non-full subset of one task does not exist)"
        )
    if part.method == "mtpsl" and len(tasks) < 2:
        raise ConfigError("config key 'partial.method': mtpsl maps between tasks; it needs 2+")
    _require(_finite(part.weight) and part.weight >= 0, "partial.weight", part.weight,
             "a finite number >= 0")  # fmt: skip
    _require(part.rampup_steps >= 0, "partial.rampup_steps", part.rampup_steps, "an integer >= 0")
    _require(_finite(part.mtpsl.lambda_reg) and part.mtpsl.lambda_reg >= 0,
             "partial.mtpsl.lambda_reg", part.mtpsl.lambda_reg, "a finite number >= 0")  # fmt: skip
    _require(_finite(part.mtpsl.film_lr) and part.mtpsl.film_lr > 0, "partial.mtpsl.film_lr",
             part.mtpsl.film_lr, "a positive learning rate")  # fmt: skip
    for key, value in (
        ("partial.jtr.distance_weight", part.jtr.distance_weight),
        ("partial.jtr.reconstruction_weight", part.jtr.reconstruction_weight),
    ):
        _require(_finite(value) and value >= 0, key, value, "a finite number >= 0")  # fmt: skip
    for key, widths in (("partial.mtpsl.widths", part.mtpsl.widths),
                        ("partial.jtr.widths", part.jtr.widths)):  # fmt: skip
        _require(bool(widths) and all(w >= 1 for w in widths), key, widths,
                 "a non-empty list of positive channel counts")  # fmt: skip


PARTIAL_METHODS = ("none", "mtpsl", "jtr")


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
    _check_kwargs(ADAPTERS, cfg.model.adapter, "model.adapter", ("in_dim", "out_dim"))
    for task_key, attr, registry, spec in (
        ("distill.task_loss", "default_loss", TASK_LOSSES, cfg.distill.task_loss),
        (
            "distill.prediction_loss",
            "default_prediction_loss",
            PREDICTION_LOSSES,
            cfg.distill.prediction_loss,
        ),
    ):
        _check_loss(
            registry,
            attr,
            spec,
            task_key,
            "classification",
            "every domain is a classification task",
        )


def _check_dense(cfg: Config) -> None:
    dense = cfg.dense
    assert dense is not None
    if not dense.tasks:
        raise ConfigError(
            f"config key 'dense.tasks': name at least one of {', '.join(DENSE_TASKS)}"
        )
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
    if dense.depth_kind not in DEPTH_KINDS:
        raise ConfigError(
            f"config key 'dense.depth_kind': {dense.depth_kind!r} is not valid; choices: "
            f"{', '.join(DEPTH_KINDS)}"
        )
    _require(dense.num_classes >= 2, "dense.num_classes", dense.num_classes, "an integer >= 2")
    if not dense.scales or not all(_finite(s) and s >= 1.0 for s in dense.scales):
        raise ConfigError(
            f"config key 'dense.scales': a non-empty list of finite zoom factors >= 1.0 expected, "
            f"got {dense.scales}"
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
    _check(DENSE_ENCODERS, dense.encoder.name, "dense.encoder.name")
    _check_kwargs(DENSE_ENCODERS, dense.encoder, "dense.encoder")
    if dense.cross_task is not None:
        _check(CROSS_TASK, dense.cross_task.name, "dense.cross_task.name")
        _check_kwargs(CROSS_TASK, dense.cross_task, "dense.cross_task", ("tasks", "channels"))
    for task, spec in dense.tasks.items():
        _check(TASK_LOSSES, spec.loss.name, f"dense.tasks.{task}.loss.name")
        kind = spec.kind or task  # None: the name is the kind
        prefix = f"dense.tasks.{task}"
        is_kind = f"{task!r} is a {kind} task"
        _check_loss(TASK_LOSSES, "default_loss", spec.loss, f"{prefix}.loss", kind, is_kind)
        if spec.prediction_loss is not None:
            _check(PREDICTION_LOSSES, spec.prediction_loss.name, f"{prefix}.prediction_loss.name")
            _check_loss(
                PREDICTION_LOSSES,
                "default_prediction_loss",
                spec.prediction_loss,
                f"{prefix}.prediction_loss",
                kind,
                is_kind,
            )


def _check_common_names(cfg: Config) -> None:
    _check(FEATURE_LOSSES, cfg.distill.feature_loss.name, "distill.feature_loss.name")
    _check(WEIGHTINGS, cfg.weighting.name, "weighting.name")
    for prefix, optim in _optims(cfg).items():
        _check(OPTIMIZERS, optim.optimizer.name, f"{prefix}.optimizer.name")
        _check(SCHEDULES, optim.scheduler.name, f"{prefix}.scheduler.name")

    _check_adatask(cfg)
    _check_update_groups(cfg)


def _check_update_groups(cfg: Config) -> None:
    """A weighting that steps once per task group does not combine with accumulation."""
    builder = WEIGHTINGS.get(cfg.weighting.name)
    if getattr(builder, "leaves_parameters_unused", False):
        _require(
            cfg.train.gradient_accumulation_steps == 1,
            "train.gradient_accumulation_steps",
            cfg.train.gradient_accumulation_steps,
            f"1 with weighting {cfg.weighting.name!r} (one optimizer step per task group and "
            "batch)",
        )


def _check_adatask(cfg: Config) -> None:
    """AdaTask's two halves go together on the student's (and baseline's) recipe."""
    weighting, optimizer = cfg.weighting.name, cfg.train.optim.optimizer.name
    if (weighting == "adatask") != (optimizer == "adatask"):
        key, value, other = (
            ("train.optim.optimizer.name", optimizer, "weighting.name=adatask")
            if weighting == "adatask"
            else ("weighting.name", weighting, "train.optim.optimizer.name=adatask")
        )
        raise ConfigError(
            f"config key {key!r}: must be 'adatask' with {other} (the weighting hands the "
            f"per-task gradients to the optimizer), got {value!r}"
        )


def _check(registry: Registry, name: str, key: str) -> None:
    if name not in registry:
        raise ConfigError(
            f"config key {key!r}: unknown {registry.kind} {name!r}; "
            f"valid choices: {', '.join(registry.names())}"
        )


# --------------------------------------------------------------------------------------------
# Keyword arguments of every component, against its builder


_GENERATORS: dict[str, Callable[..., Any]] = {
    "synthetic-decathlon": ensure_mini_decathlon,
    "mini-scenes": ensure_mini_scenes,
}
"""Generated data sources and the function whose arguments ``data.generator`` holds."""

_POSITIVE_ARGUMENTS = frozenset(
    {"lr", "temperature", "eps", "sigma_scale", "threshold", "hidden_mult", "gamma",
     "width_mult", "in_channels", "reduction", "pool", "heads", "scale", "image_size", "height",
     "width"}
)  # fmt: skip
"""Arguments (of any component) that must be > 0: rates, sizes, temperatures, divisors."""

_NON_NEGATIVE_ARGUMENTS = frozenset(
    {"momentum", "weight_decay", "warmup_steps", "label_smoothing", "min_factor", "seed"}
)
"""Arguments that must be >= 0."""


def _optims(cfg: Config) -> dict[str, OptimConfig]:
    """Every optimizer + schedule of the run, by its key."""
    return {
        f"{prefix}.{part}": getattr(recipe, part)
        for prefix, recipe in _recipes(cfg).items()
        for part in ("optim", "adapter_optim")
    }


def _check_common_kwargs(cfg: Config) -> None:
    _check_kwargs(FEATURE_LOSSES, cfg.distill.feature_loss, "distill.feature_loss")
    _trial("distill.feature_loss.kwargs", lambda: _build(FEATURE_LOSSES, cfg.distill.feature_loss))
    _check_kwargs(WEIGHTINGS, cfg.weighting, "weighting", ("tasks",))
    if cfg.dense is not None:  # the tasks are known before the data is read
        _check_weighting_build(cfg, list(cfg.dense.tasks))
    recipes = _recipes(cfg)
    for prefix, optim in _optims(cfg).items():
        _check_optim(prefix, optim, recipes[prefix.rsplit(".", 1)[0]].max_steps)


def _check_optim(prefix: str, optim: OptimConfig, total_steps: int) -> None:
    """Both specs' arguments, then a real optimizer and schedule on a dummy parameter (torch's
    own checks of lr, momentum, nesterov...)."""
    _check_kwargs(OPTIMIZERS, optim.optimizer, f"{prefix}.optimizer", ("params",))
    _check_kwargs(SCHEDULES, optim.scheduler, f"{prefix}.scheduler", ("optimizer", "total_steps"))
    params = [nn.Parameter(torch.zeros(1))]
    spec = optim.optimizer
    optimizer = _trial(
        f"{prefix}.optimizer.kwargs", lambda: build_optimizer(spec.name, params, spec.kwargs)
    )
    sched = optim.scheduler
    schedule = _trial(
        f"{prefix}.scheduler.kwargs",
        lambda: build_scheduler(sched.name, optimizer, total_steps, sched.kwargs),
    )
    for step in (0, total_steps // 2, total_steps):  # the schedule's factor stays a valid rate
        factors = [f(step) for f in schedule.lr_lambdas]
        _require(
            all(_finite(f) and f >= 0 for f in factors),
            f"{prefix}.scheduler.kwargs",
            sched.kwargs,
            f"arguments giving a finite learning-rate factor >= 0 (at step {step}: {factors})",
        )


def _check_loss(
    registry: Registry, default_attr: str, spec: Spec, key: str, kind: str, is_kind: str
) -> None:
    """A loss's arguments (then the loss, built), and its fit to the task's kind.

    A loss belongs to the kinds whose default it is or whose name prefixes its own
    (``depth_berhu`` is a depth loss); a loss that belongs to other kinds only is refused. A
    loss no kind claims fits every kind.
    """
    _check_kwargs(registry, spec, key)
    _trial(f"{key}.kwargs", lambda: _build(registry, spec))
    owners = _loss_kinds(registry, default_attr)
    if spec.name in owners and kind not in owners[spec.name]:
        valid = [n for n in registry.names() if kind in owners.get(n, {kind})]
        raise ConfigError(
            f"config key '{key}.name': {spec.name!r} is a {registry.kind} for "
            f"{' / '.join(sorted(owners[spec.name]))} tasks, but {is_kind}; "
            f"valid for {kind}: {', '.join(valid)}"
        )


def _loss_kinds(registry: Registry, default_attr: str) -> dict[str, set[str]]:
    """``{loss name: the task kinds it is for}``, from :data:`unirep.tasks.TASK_KINDS`."""
    owners: dict[str, set[str]] = {}
    for kind in TASK_KINDS.names():
        default = getattr(TASK_KINDS.get(kind), default_attr)
        for name in registry.names():
            if name == default or name.startswith(f"{kind}_"):
                owners.setdefault(name, set()).add(kind)
    return owners


def _build(registry: Registry, spec: Spec) -> Any:
    return registry.build(spec.name, **spec.kwargs)


def _check_weighting_build(cfg: Config, tasks: list[str]) -> None:
    """The weighting built for the run's tasks: its own refusals (a negative weight, an unknown
    distribution or group member, a missing optional solver) stop the run before any work."""
    spec = cfg.weighting
    _trial("weighting.kwargs", lambda: WEIGHTINGS.build(spec.name, tasks=tasks, **spec.kwargs))


def _trial(key: str, build: Callable[[], Any]) -> Any:
    """``build()``; its refusal of an argument becomes a :class:`ConfigError` naming ``key``."""
    try:
        return build()
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"config key {key!r}: {err}") from err


def _check_kwargs(registry: Registry, spec: Spec, key: str, supplied: Iterable[str] = ()) -> None:
    """``spec.kwargs`` against the signature of ``spec.name``'s builder (the name is known)."""
    _check_arguments(
        registry.get(spec.name),
        spec.kwargs,
        f"{key}.kwargs",
        f"{registry.kind} {spec.name!r}",
        tuple(supplied),
    )


def _check_arguments(
    builder: Callable[..., Any],
    kwargs: dict[str, Any],
    key: str,
    what: str,
    supplied: tuple[str, ...],
) -> None:
    """Refuse unknown, reserved and missing arguments, values of the wrong type (by the
    parameter's default), non-finite numbers and out-of-range rates and sizes."""
    parameters = {
        name: p
        for name, p in inspect.signature(builder).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(builder).parameters.values())
    valid = [n for n in parameters if n not in supplied]
    for name, value in kwargs.items():
        arg_key = f"{key}.{name}"
        if name in supplied:
            raise ConfigError(
                f"config key {arg_key!r}: unirep sets {name!r} of {what} itself; remove the key"
            )
        if name not in parameters and not takes_any:
            raise ConfigError(
                f"config key {arg_key!r}: {what} takes no argument {name!r}; valid: "
                f"{', '.join(valid) or 'none'}"
            )
        default = parameters[name].default if name in parameters else inspect.Parameter.empty
        _check_argument(arg_key, name, value, default)
    missing = [
        n for n in valid if parameters[n].default is inspect.Parameter.empty and n not in kwargs
    ]
    if missing:
        raise ConfigError(f"config key {key!r}: {what} needs {', '.join(missing)}")


def _check_argument(key: str, name: str, value: Any, default: Any) -> None:
    if isinstance(default, bool):
        _require(isinstance(value, bool), key, value, "true or false")
    elif isinstance(default, int):
        _require(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
    elif isinstance(default, float):
        _require(_is_number(value), key, value, "a number")
    elif isinstance(default, str):
        _require(isinstance(value, str), key, value, "a string")
    numbers = value if isinstance(value, list) else [value]
    for number in numbers:
        if not _is_number(number):
            continue
        _require(math.isfinite(number), key, value, "finite")
        if name in _POSITIVE_ARGUMENTS or name == "milestones":
            _require(number > 0, key, value, "> 0")
        if name in _NON_NEGATIVE_ARGUMENTS:
            _require(number >= 0, key, value, ">= 0")


# --------------------------------------------------------------------------------------------
# Keys that name tasks


def _task_keys(cfg: Config) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(settings, uses)``: ``(key, task)`` of every config entry that names a task.

    A setting (a per-task λ, batch size, crop...) may name a domain of the source that the run
    leaves out; a use (the teacher to fine-tune from or initialise the student with) may not.
    """
    data, distill = cfg.data, cfg.distill
    settings = [
        *((f"distill.lambda_feature.{t}", t) for t in distill.lambda_feature),
        *((f"distill.lambda_prediction.{t}", t) for t in distill.lambda_prediction),
        *((f"teachers.finetune_lr.{t}", t) for t in cfg.teachers.finetune_lr),
        *((f"data.batch_sizes.{t}", t) for t in data.batch_sizes),
        *((f"data.crops.{t}", t) for t in data.crops),
        *(("data.no_flip", t) for t in data.no_flip),
        *(("data.square_resize", t) for t in data.square_resize),
    ]
    for name, value in cfg.weighting.kwargs.items():
        if isinstance(value, dict):  # a per-task argument of the weighting
            settings += [(f"weighting.kwargs.{name}.{t}", str(t)) for t in value]
    uses = [
        (key, task)
        for key, task in (
            ("teachers.finetune_from", cfg.teachers.finetune_from),
            ("distill.init_from_teacher", distill.init_from_teacher),
        )
        if task is not None
    ]
    return settings, uses


def _known_tasks(cfg: Config) -> tuple[list[str] | None, list[str] | None]:
    """(the run's tasks, the tasks settings may name) as far as the config alone tells."""
    if cfg.dense is not None:  # a setting may name a task of the benchmark the run leaves out
        tasks = list(cfg.dense.tasks)
        return tasks, tasks + [t for t in DENSE_TASKS if t not in tasks]
    if cfg.data.domains:  # other domains of the source are known only from the data
        return list(cfg.data.domains), None
    return None, None


def _check_task_keys(cfg: Config, tasks: list[str] | None, nameable: list[str] | None) -> None:
    """Every key naming a task names one of ``tasks`` (a use) or of ``nameable`` (a setting);
    None: not known yet (checked again by :func:`check_against_data`)."""
    settings, uses = _task_keys(cfg)
    for entries, known, what in (
        (uses, tasks, "a task of this run"),
        (settings, nameable, "a task of this run or of its data"),
    ):
        if known is None:
            continue
        for key, task in entries:
            if task not in known:
                raise ConfigError(
                    f"config key {key!r}: {task!r} is not {what}; valid: {', '.join(known)}"
                )


def _source_domains(cfg: Config) -> list[str]:
    """Every domain of ``data.source`` (``data.domains`` picks some of them)."""
    everything = dataclasses.replace(cfg.data, domains=[])
    return list(
        DATA_SOURCES.build(cfg.data.source, cfg=everything, cache_dir=cache_dir(cfg)).domains
    )
