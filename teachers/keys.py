"""Which teacher a run asks for: each task's training recipe (the benchmark family's) and the key
that names its cached folder.

The two benchmark families' recipes: a classification run (Visual Decathlon and the like)
trains the teacher of ``classification.finetune_from`` from scratch with ``teachers.train`` and
fine-tunes every other domain's teacher from it with ``classification.finetune_train`` and its
per-domain learning rates (Rebuffi et al. 2017; Li, Liu & Bilen 2023), or trains each from
scratch when no source is set; a dense run trains every task's teacher from scratch with
``teachers.train``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from unirep.config.load import to_dict
from unirep.config.schema import Config, TrainConfig
from unirep.data.streams import RunData
from unirep.errors import ConfigError
from unirep.models.build import architecture
from unirep.teachers.store import teacher_folder


def finetune_source(cfg: Config) -> str | None:
    """The task whose teacher initialises the others (``classification.finetune_from``), or
    None: every teacher from scratch (always, for dense runs)."""
    return cfg.classification.finetune_from if cfg.classification is not None else None


def teacher_recipe(cfg: Config, task: str) -> TrainConfig:
    """The training recipe of ``task``'s teacher: ``teachers.train``, or for the tasks fine-tuned
    from ``classification.finetune_from`` the ``classification.finetune_train`` recipe with its
    per-task lr."""
    source = finetune_source(cfg)
    if source is None or source == task:
        return cfg.teachers.train
    assert cfg.classification is not None
    spec = cfg.classification
    recipe = copy.deepcopy(spec.finetune_train or cfg.teachers.train)
    if task in spec.finetune_lr:  # e.g. 0.1 or 0.01 per domain in the reference
        recipe.optim.optimizer.kwargs["lr"] = spec.finetune_lr[task]
    return recipe


def check_config(cfg: Config) -> None:
    """The fine-tuning recipe's rules: per-task learning rates need a source teacher, and the
    source (trained from scratch with ``teachers.train``) takes none."""
    if cfg.classification is None:
        return
    spec = cfg.classification
    if spec.finetune_lr and spec.finetune_from is None:
        raise ConfigError(
            "config key 'classification.finetune_lr' has no effect without "
            "'classification.finetune_from' (the teacher whose trunk initialises the others); "
            "set it or remove the key"
        )
    source = spec.finetune_from
    if source is not None and source in spec.finetune_lr:
        raise ConfigError(
            f"config key 'classification.finetune_lr.{source}': {source!r} is "
            "classification.finetune_from, trained from scratch with teachers.train (set its lr "
            "in teachers.train.optim.optimizer.kwargs.lr); remove the key"
        )


MEASUREMENT_ONLY = frozenset({"diagnostics_every", "channels_last", "compile"})
"""Training-recipe keys that measure a phase, or only change its speed (the same maths to float
rounding), without changing what it learns: not in a teacher's key (so adding one never
invalidates the teachers already cached). Run-level measurement keys (``log_with``,
``progress``) sit outside the recipe, so they never reach the key at all."""


KEPT_IN_KEYS = {"selection_metric": "accuracy"}
"""Recipe entries of unirep 0.3 that no longer exist but stay in the hashed content with their
only value then, so the teachers cached by 0.3 keep their keys (and are not retrained)."""


ADDED_SINCE_0_4 = {"mixup": 0.0}
"""Recipe entries added after 0.4 and their defaults: left out of the hashed content while at the
default (a recipe that does not use them is the same recipe as before), in it otherwise."""


def teacher_key(cfg: Config, data: RunData, task: str, world_size: int = 1) -> str:
    """What determines a teacher's weights, hashed: the architecture, the task (kind, classes,
    loss), the training data's fingerprint, its preprocessing and global batch size (per process
    × ``world_size``), the training recipe and seed, and (for a fine-tuned teacher) the key of the
    teacher it starts from. A change to
    any of them gives another key, hence another folder: a cached teacher is never reused for
    another recipe, nor overwritten by one."""
    record = data.tasks()[task]
    stream = record.stream
    content = {
        "architecture": architecture(cfg),
        "task": {**record.record(), "loss": list(record.loss)},
        "data": data.fingerprint(task),
        "preprocessing": data.preprocessing(stream),
        "global_batch_size": data.batch_sizes()[stream] * world_size,
        "recipe": {
            **{
                k: v
                for k, v in to_dict(teacher_recipe(cfg, task)).items()
                if k not in MEASUREMENT_ONLY
                and not (k in ADDED_SINCE_0_4 and v == ADDED_SINCE_0_4[k])
            },
            **KEPT_IN_KEYS,
        },
        "seed": cfg.seed,
    }
    source = finetune_source(cfg)
    if source is not None and source != task:
        content["finetuned_from"] = teacher_key(cfg, data, source, world_size)
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def teacher_path(cfg: Config, data: RunData, task: str, world_size: int = 1) -> Path:
    """``<teacher_root>/<task>-<key[:12]>/``: the cache folder of ``task``'s teacher. The key,
    not the preset, names it: presets with the same teacher recipe share their teachers (e.g.
    ``mini-scenes`` and the full-label teachers a ``mini-scenes-onelabel`` run compares with)."""
    return teacher_folder(cfg, task, teacher_key(cfg, data, task, world_size))
