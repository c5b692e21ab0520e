"""The config rules the data owns, checked at start-up before anything is read or built.

:func:`check_config` checks what the config alone tells: the data source fits the run's kind,
a generator's arguments, crops against the resize, the dense tasks' kinds, the partial-label
protocol, and every key that names a task. :func:`check_against_data` checks, as soon as the
data is resolved and still before any work, what only the data tells: split sizes against batch
sizes, and the task names of per-task keys when the source decides the tasks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from unirep.config.binder import bind_arguments
from unirep.config.load import cache_dir
from unirep.config.schema import Config
from unirep.data.classification.mini_decathlon import MINI_DECATHLON_DOMAINS, ensure_mini_decathlon
from unirep.data.classification.sources import DATA_SOURCES
from unirep.data.dense.mini_scenes import ensure_mini_scenes
from unirep.data.dense.sources import DENSE_SOURCES
from unirep.errors import ConfigError
from unirep.tasks import TASK_KINDS

if TYPE_CHECKING:
    from unirep.data.streams import RunData

GENERATORS = {"synthetic-decathlon": ensure_mini_decathlon, "mini-scenes": ensure_mini_scenes}
"""Generated data sources and the function whose arguments ``data.generator`` holds."""

PDF_MIN_IMAGES = 4
"""The fewest validation images debiased CKA (progressive decoder fusion) can compare on."""


def dense_kinds() -> list[str]:
    """The task kinds a dense run can have: those predicted per pixel."""
    return [k for k in TASK_KINDS.names() if TASK_KINDS.get(k).spatial]


def check_config(cfg: Config) -> None:
    """Raise :class:`ConfigError`, naming the key, for data settings that cannot work."""
    sources = list(DENSE_SOURCES) if cfg.dense is not None else DATA_SOURCES.names()
    if cfg.data.source not in sources:
        raise ConfigError(
            f"config key 'data.source': {cfg.data.source!r} is not a {cfg.kind} data source; "
            f"valid choices: {', '.join(sources)}"
        )
    generator = GENERATORS.get(cfg.data.source)
    if generator is not None:
        bind_arguments(generator, cfg.data.generator, "data.generator",
                       f"the {cfg.data.source} generator", ("root",))  # fmt: skip
    if cfg.classification is not None:
        _check_images(cfg)
        _check_overlap(cfg)
    else:
        _check_dense_tasks(cfg)
        _check_partial(cfg)
    check_task_keys(cfg, *_known_tasks(cfg))


def _check_images(cfg: Config) -> None:
    spec = cfg.classification
    assert spec is not None
    crops = {"classification.crop": spec.crop}
    crops.update({f"classification.crops.{d}": c for d, c in spec.crops.items()})
    for key, crop in crops.items():
        if crop > spec.resize:
            raise ConfigError(
                f"config key {key!r} ({crop}) must be positive and not exceed "
                f"'classification.resize' ({spec.resize})"
            )


def _check_overlap(cfg: Config) -> None:
    """Carved tasks (``classification.overlap``): at least two, each of at least two classes of
    a domain the run may read, named apart from the domains, on domains of one crop size (the
    auxiliary task pools their images into one batch)."""
    spec = cfg.classification
    assert spec is not None
    overlap = spec.overlap
    if overlap is None:
        return
    key = "classification.overlap.tasks"
    if len(overlap.tasks) < 2:
        raise ConfigError(f"config key {key!r}: name at least 2 tasks, got {len(overlap.tasks)}")
    known = source_domains(cfg)
    allowed = spec.domains or known
    for name, task in overlap.tasks.items():
        if len(task.classes) < 2:
            raise ConfigError(
                f"config key '{key}.{name}.classes': a task needs at least 2 classes, got "
                f"{task.classes}"
            )
        if allowed is not None and task.domain not in allowed:
            raise ConfigError(
                f"config key '{key}.{name}.domain': {task.domain!r} is not a domain of this run; "
                f"valid: {', '.join(allowed)}"
            )
        if known is not None and name in known and name != task.domain:
            raise ConfigError(
                f"config key '{key}.{name}': the task has the name of domain {name!r} but carves "
                f"{task.domain!r}; rename it"
            )
    crops = {spec.crops.get(t.domain, spec.crop) for t in overlap.tasks.values()}
    if len(crops) > 1:
        raise ConfigError(
            f"config key 'classification.crops': the carved tasks' domains have crops "
            f"{sorted(crops)}; valid: one crop for every domain {key} names"
        )


def _check_dense_tasks(cfg: Config) -> None:
    dense = cfg.dense
    assert dense is not None
    kinds = dense_kinds()
    if not dense.tasks:
        raise ConfigError(f"config key 'dense.tasks': name at least one of {', '.join(kinds)}")
    for task, spec in dense.tasks.items():
        if spec.kind is not None and spec.kind not in kinds:
            raise ConfigError(
                f"config key 'dense.tasks.{task}.kind': unknown dense task kind {spec.kind!r}; "
                f"valid choices: {', '.join(kinds)}"
            )
        if spec.kind is None and task not in kinds:
            raise ConfigError(
                f"config key 'dense.tasks.{task}': unknown dense task; name it one of "
                f"{', '.join(kinds)}, or set 'dense.tasks.{task}.kind' to one of them"
            )


def _check_partial(cfg: Config) -> None:
    """Partially labelled data: the split file, fractions and tasks the protocol needs."""
    assert cfg.dense is not None
    part, tasks = cfg.dense.partial, list(cfg.dense.tasks)
    if part.protocol == "file":
        if not part.file:
            raise ConfigError("config key 'dense.partial.file': protocol 'file' needs a split file")
        if not Path(part.file).expanduser().is_file():
            raise ConfigError(f"config key 'dense.partial.file': {part.file!r} does not exist")
    elif part.file:
        raise ConfigError(
            f"config key 'dense.partial.file' is only read with dense.partial.protocol=file "
            f"(protocol is {part.protocol!r})"
        )
    for key, names in (("dense.partial.fractions", part.fractions),
                       ("dense.partial.file_tasks", part.file_tasks)):  # fmt: skip
        unknown = [t for t in names if t not in tasks]
        if unknown:
            raise ConfigError(
                f"config key {key!r} names {', '.join(map(repr, unknown))}, not a task of this "
                f"run ({', '.join(tasks)})"
            )
    if part.protocol == "random-labels" and len(tasks) < 2:
        raise ConfigError(
            "config key 'dense.partial.protocol': random-labels needs at least 2 tasks (a "
            "non-empty, non-full subset of one task does not exist)"
        )


# --------------------------------------------------------------------------------------------
# Keys that name tasks


def _task_keys(cfg: Config) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(settings, uses)``: ``(key, task)`` of every config entry that names a task.

    A setting (a per-task λ, batch size, crop...) may name a domain of the source that the run
    leaves out; a use (the teacher to fine-tune from or initialise the student with) may not.
    """
    distill = cfg.distill
    settings = [
        *((f"distill.lambda_feature.{t}", t) for t in distill.lambda_feature),
        *((f"distill.lambda_prediction.{t}", t) for t in distill.lambda_prediction),
    ]
    uses: list[tuple[str, str]] = []
    spec = cfg.classification
    if spec is not None:
        settings += [
            *((f"classification.finetune_lr.{t}", t) for t in spec.finetune_lr),
            *((f"classification.batch_sizes.{t}", t) for t in spec.batch_sizes),
            *((f"classification.crops.{t}", t) for t in spec.crops),
            *(("classification.no_flip", t) for t in spec.no_flip),
            *(("classification.square_resize", t) for t in spec.square_resize),
        ]
        uses += [
            (key, task)
            for key, task in (
                ("classification.finetune_from", spec.finetune_from),
                ("classification.init_from_teacher", spec.init_from_teacher),
            )
            if task is not None
        ]
    for name, value in cfg.weighting.kwargs.items():
        if isinstance(value, dict):  # a per-task argument of the weighting
            settings += [(f"weighting.kwargs.{name}.{t}", str(t)) for t in value]
    return settings, uses


def source_domains(cfg: Config) -> list[str] | None:
    """Every domain ``data.source`` has, when the config alone tells (the generated
    mini-decathlon in the cache, Hugging Face domains); None when only the data on disk does."""
    spec = cfg.classification
    assert spec is not None
    hf = list(spec.hf_domains)
    if cfg.data.source == "synthetic-decathlon" and not cfg.data.root:
        return [d.name for d in MINI_DECATHLON_DOMAINS] + hf
    if cfg.data.source == "hf":
        return hf
    return None


def _known_tasks(cfg: Config) -> tuple[list[str] | None, list[str] | None]:
    """(the run's tasks, the tasks settings may name) as far as the config alone tells."""
    if cfg.dense is not None:  # a setting may name a task of the benchmark the run leaves out
        tasks = list(cfg.dense.tasks)
        return tasks, tasks + [k for k in dense_kinds() if k not in tasks]
    assert cfg.classification is not None
    everything = source_domains(cfg)
    if cfg.classification.overlap is not None:  # the carved tasks; settings may name domains
        carved = list(cfg.classification.overlap.tasks)
        return carved, None if everything is None else carved + everything
    picked = cfg.classification.domains
    if everything is not None:
        unknown = [d for d in picked if d not in everything]
        if unknown:
            raise ConfigError(
                f"config key 'classification.domains': {', '.join(map(repr, unknown))} "
                f"{'is' if len(unknown) == 1 else 'are'} not a domain of data.source "
                f"{cfg.data.source!r}; valid: {', '.join(everything)}"
            )
        return list(picked) or everything, everything
    if picked:  # other domains of the source are known only from the data
        return list(picked), None
    return None, None


def check_task_keys(cfg: Config, tasks: list[str] | None, nameable: list[str] | None) -> None:
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
    """Every domain of ``data.source`` (``classification.domains`` picks some of them)."""
    assert cfg.classification is not None
    everything = dataclasses.replace(cfg.classification, domains=[])
    source = DATA_SOURCES.build(
        cfg.data.source, data=cfg.data, spec=everything, cache_dir=cache_dir(cfg)
    )
    return list(source.domains)


def check_against_data(cfg: Config, data: RunData, world_size: int = 1) -> None:
    """What the config says against what the data holds, before any training.

    Every stream's training split must hold at least one batch of every process
    (``batch · world_size`` samples; the key named is ``classification.batch_sizes.<domain>``
    when it sets the stream's batch, else ``data.batch_size``). When ``classification.domains``
    is empty the run's tasks are every domain of the source, known only now: each per-task key
    must name one of them. When it picks some domains, a per-domain setting may also name
    another domain of the source (a preset describes the whole benchmark), but a typo is refused.
    """
    tasks = list(data.tasks())
    if cfg.classification is not None:
        everything = _source_domains(cfg) if cfg.classification.domains else tasks
        if cfg.classification.overlap is not None:  # carved tasks; settings may name domains
            everything = tasks + _source_domains(cfg)
        check_task_keys(cfg, tasks, everything)
    per_domain = cfg.classification.batch_sizes if cfg.classification is not None else {}
    sizes = data.batch_sizes()
    for stream, dataset in data.datasets("train", train=True).items():
        available = len(dataset)  # type: ignore[arg-type]
        batch = sizes[stream]
        if batch * world_size > available:
            key = (
                f"classification.batch_sizes.{stream}"
                if stream in per_domain
                else "data.batch_size"
            )
            processes = f" × {world_size} processes" if world_size > 1 else ""
            raise ConfigError(
                f"config key {key!r}: a training batch of {batch} per process{processes} exceeds "
                f"the {available} training samples of {stream!r}; valid: at most "
                f"{available // world_size}"
            )
    if cfg.dense is not None and cfg.dense.partial.protocol != "full":
        batch = sizes[next(iter(sizes))]
        for task in tasks:  # each teacher trains on the images labelled for its task
            labelled = len(data.labelled_train_set(task))  # type: ignore[arg-type]
            if batch * world_size > labelled:
                raise ConfigError(
                    f"config key 'data.batch_size': the teacher of {task!r} trains on the "
                    f"{labelled} training images labelled for it (dense.partial.protocol="
                    f"{cfg.dense.partial.protocol}), fewer than a batch of {batch * world_size}; "
                    f"valid: at most {labelled // world_size}"
                )
    if cfg.dense is not None and cfg.dense.sharing is not None and cfg.dense.sharing.name == "pdf":
        for stream, dataset in data.datasets("val").items():  # the CKA reads validation images
            if len(dataset) < PDF_MIN_IMAGES:  # type: ignore[arg-type]
                raise ConfigError(
                    f"config key 'dense.sharing': progressive decoder fusion compares the tasks "
                    f"on validation images, and {stream!r} has {len(dataset)}; valid: a "  # type: ignore[arg-type]
                    f"validation split of at least {PDF_MIN_IMAGES} images (dense.val_folder, "
                    "dense.val_fraction)"
                )
