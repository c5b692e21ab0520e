"""The whole recipe as functions, for callers that run many runs (``scripts/compare.py``).

:func:`run_recipe` is what ``scripts/distill.py`` does (stage one, the teachers missing from the
cache, then stage two) for a preset and its ``key=value`` overrides, in the calling process;
:func:`train_teacher_job` trains one task's teacher into the cache. Both are plain module-level
functions, so :func:`unirep.jobs.run_jobs` can run them in worker processes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from teachers.recipe import ensure_teachers
from unirep.config import Config, ConfigError
from unirep.io import read_json
from unirep.recipe import METRICS, distill, resolve_data
from unirep.rundir import (
    check_same_config,
    make_accelerator,
    prepare_run_dir,
    run_finished,
    teacher_path,
)
from unirep.teachers import MANIFEST
from unirep.validate import load_config


def _config(preset: str | None, overrides: list[str]) -> Config:
    cfg = load_config(preset, overrides)
    cfg.progress = False
    return cfg


def run_recipe(preset: str | None, overrides: list[str]) -> dict[str, Any]:
    """Run (or resume, or read back when finished) the whole recipe of ``preset`` with
    ``overrides`` (which must name the run: ``name=...``); returns its ``metrics.json``."""
    cfg = _config(preset, overrides)
    if not cfg.name:
        raise ConfigError("run_recipe needs the run's name (name=<run name>)")
    run_dir = Path(cfg.output_dir) / cfg.name
    if run_finished(run_dir):  # read back only for the config that produced it
        check_same_config(cfg, run_dir / "config.yaml", finished=True)
        return read_json(run_dir / METRICS, what="run metrics")
    if (run_dir / "config.yaml").exists():
        cfg.resume = True  # an interrupted run continues where it stopped
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    run_dir = prepare_run_dir(cfg, accelerator)
    seconds = ensure_teachers(cfg, accelerator, data, run_dir)
    return distill(cfg, accelerator, data, run_dir, seconds)


def train_teacher_job(preset: str | None, overrides: list[str], task: str, folder: str) -> str:
    """Train ``task``'s teacher of the run ``preset`` + ``overrides`` into the cache unless it
    is there (verified); its checkpoints and logs go to ``folder``. Returns the cache folder."""
    cfg = _config(preset, overrides)
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    cached = teacher_path(cfg, data, task, accelerator.num_processes)
    scratch = Path(folder)
    checkpoints = scratch / "checkpoints" / f"teacher-{task}"
    if accelerator.is_main_process:
        if not (cached / MANIFEST).exists():  # a killed job's partial training starts over
            shutil.rmtree(checkpoints, ignore_errors=True)
            (scratch / "logs" / f"teacher-{task}.csv").unlink(missing_ok=True)
        scratch.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    ensure_teachers(cfg, accelerator, data, scratch, only=[task])
    if accelerator.is_main_process:
        shutil.rmtree(checkpoints, ignore_errors=True)  # the cache holds the teacher
    return str(cached)
