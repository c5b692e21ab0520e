"""The config rules the training loop owns: the device against mixed precision and the
teachers' autocast, ``compile`` only where torch.compile works, mixup only where it applies, the
trackers of ``log_with`` installed, and a run folder that is either resumed or overwritten, not
both."""

from __future__ import annotations

import importlib.util

import torch

from unirep.config.schema import Config
from unirep.errors import ConfigError
from unirep.teachers.batched import teacher_autocast_dtype
from unirep.training.tracking import tracker_names


def device_type(cfg: Config) -> str:
    """Where the run goes: ``cuda`` when present (unless ``cpu=true``), else ``cpu``."""
    return "cpu" if cfg.cpu or not torch.cuda.is_available() else "cuda"


def check_config(cfg: Config) -> None:
    """Raise :class:`ConfigError`, naming the key, for a setting the device cannot run."""
    tracker_names(cfg.log_with)  # the tracker's package is installed
    if cfg.overwrite and cfg.resume:
        resume = "true" if cfg.resume is True else repr(cfg.resume)
        raise ConfigError(
            f"config key 'overwrite': true cannot be combined with resume={resume}: resume "
            "continues the run folder, overwrite deletes it; set one of them"
        )
    device = torch.device(device_type(cfg))
    if cfg.mixed_precision == "fp16" and device.type == "cpu":
        reason = "cpu=true" if cfg.cpu else "no CUDA device is available"
        raise ConfigError(
            f"config key 'mixed_precision': 'fp16' needs a CUDA GPU, but this run is on CPU "
            f"({reason}); valid on CPU: bf16 or no"
        )
    teacher_autocast_dtype(cfg.teachers.autocast, device)
    check_mixup(cfg)
    keys = [f"{prefix}.compile" for prefix, recipe in cfg.recipes().items() if recipe.compile]
    if keys:
        problem = compile_problem(device.type)
        if problem is not None:
            raise ConfigError(
                f"config key {keys[0]!r}: torch.compile does not work on this {device.type} "
                f"machine ({problem}); set {keys[0]}=false"
            )


def check_mixup(cfg: Config) -> None:
    """Mixup mixes class labels: classification only, and the teachers must see the mixed images
    (online), not read their outputs on unmixed ones from the output cache."""
    for prefix, recipe in cfg.recipes().items():
        if recipe.mixup <= 0:
            continue
        if cfg.dense is not None:
            raise ConfigError(
                f"config key '{prefix}.mixup': mixup mixes class labels, for classification runs "
                f"only; set {prefix}.mixup=0 for a dense run"
            )
        if prefix == "train" and cfg.distill.enabled and cfg.teachers.output_cache.draws > 0:
            raise ConfigError(
                f"config key '{prefix}.mixup': the teachers must see the mixed images, but "
                "teachers.output_cache.draws > 0 reads their outputs on unmixed ones; set "
                "teachers.output_cache.draws=0 or train.mixup=0"
            )


def compile_problem(device_type: str) -> str | None:
    """Why torch.compile cannot run on ``device_type`` here, or None. On CUDA, Inductor needs
    Triton; on CPU it compiles C++, so a tiny function is compiled to find out."""
    if device_type == "cuda":
        return None if importlib.util.find_spec("triton") else "the triton package is missing"
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2))
    except Exception as err:  # any failure means: not usable here
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]
    return None
