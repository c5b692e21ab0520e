"""The whole recipe as functions: for Python users (:func:`run`) and callers that run many runs
(``scripts/compare.py``).

:func:`run` is what ``scripts/distill.py`` does (stage one, the teachers missing from the cache,
then stage two: the student distilled, evaluated, exported and reported) for a config object, a
preset or a YAML path and ``key=value`` overrides, in the calling process; the script calls it.
:func:`run_recipe` does the same for a named run, reading a finished one back;
:func:`train_teacher_job` trains one task's teacher into the cache. Both are plain module-level
functions, so :func:`unirep.experiments.jobs.run_jobs` can run them in worker processes.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import unirep.layout as layout
from unirep.config.schema import Config
from unirep.errors import ConfigError, UnirepError
from unirep.io import read_json
from unirep.pipeline.rundir import (
    check_output_dir,
    check_same_config,
    forget_unstarted_run,
    make_accelerator,
    prepare_run_dir,
    release_run_dir,
    run_finished,
    stop_trackers,
)
from unirep.pipeline.stage_two import METRICS, distill, resolve_data
from unirep.pipeline.validate import load_config, resolve_config
from unirep.stage_one.keys import teacher_path
from unirep.stage_one.train import ensure_teachers
from unirep.teachers.store import MANIFEST


@dataclass
class RunResult:
    """What :func:`run` returns.

    Attributes:
        directory: the run folder (``<output_dir>/<name>/``, see the run-directory contract).
        metrics: its ``metrics.json`` (``preset``, ``split``, ``tasks``, ``summary``).
        already_finished: the run had finished before this call: nothing was computed, the
            metrics were read back.
    """

    directory: Path
    metrics: dict[str, Any]
    already_finished: bool = False

    @property
    def student(self) -> Path:
        """The exported student's folder, for ``unirep.load_student(result.student)``."""
        return layout.student_dir(self.directory)


def run(config: Config | str | Path | None = None, overrides: Sequence[str] = ()) -> RunResult:
    """Run the whole recipe from Python, as ``unirep distill`` does: train the teachers missing
    from the cache, then distil, evaluate, export and report the student.

    Args:
        config: a :class:`~unirep.config.schema.Config`, a preset name or a YAML path (None:
            the default preset, ``mini-decathlon``); a Config is copied, not changed.
        overrides: dotted ``key=value`` settings on top of it (``["train.max_steps=100"]``).

    Returns:
        The run folder and its metrics. With ``resume=true`` a finished run is read back, never
        recomputed, and an interrupted one continues where it stopped. Under ``accelerate
        launch`` every process calls it and gets the same result. The trackers of ``log_with``
        are finished on return; the process group is left for a next call.
    """
    return run_config(resolve_config(config, overrides))


def run_config(cfg: Config) -> RunResult:
    """:func:`run` for a config already validated (by the command line or
    :func:`~unirep.pipeline.validate.resolve_config`): validation runs once per command."""
    check_output_dir(Path(cfg.output_dir) / cfg.name if cfg.name else Path(cfg.output_dir))
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)  # bad data fails before anything is written
    run_dir = prepare_run_dir(cfg, accelerator)
    try:
        if run_finished(run_dir):  # resume=true on a finished run: nothing recomputed or rewritten
            accelerator.print(
                f"{run_dir} is already finished; nothing to do (its results are kept)"
            )
            return RunResult(run_dir, read_json(run_dir / METRICS, what="run metrics"), True)
        accelerator.print(f"run directory: {run_dir}  (processes: {accelerator.num_processes})")
        try:
            teacher_seconds = ensure_teachers(cfg, accelerator, data, run_dir)
        except UnirepError:  # e.g. a damaged cached teacher: the fixed command must run again
            if accelerator.is_main_process:
                forget_unstarted_run(run_dir)
            raise
        return RunResult(run_dir, distill(cfg, accelerator, data, run_dir, teacher_seconds))
    finally:  # the next run in this process starts its own (log_with) and may take the folder
        stop_trackers(accelerator)
        release_run_dir(run_dir)


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
        check_same_config(cfg, run_dir / layout.CONFIG, finished=True)
        return read_json(run_dir / METRICS, what="run metrics")
    if (run_dir / layout.CONFIG).exists():
        cfg.resume = True  # an interrupted run continues where it stopped
    return run_config(cfg).metrics


def train_teacher_job(preset: str | None, overrides: list[str], task: str, folder: str) -> str:
    """Train ``task``'s teacher of the run ``preset`` + ``overrides`` into the cache unless it
    is there (verified); its checkpoints and logs go to ``folder``. Returns the cache folder."""
    cfg = _config(preset, overrides)
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    cached = teacher_path(cfg, data, task, accelerator.num_processes)
    scratch = Path(folder)
    checkpoints = layout.checkpoint_dir(scratch, f"teacher-{task}")
    if accelerator.is_main_process:
        if not (cached / MANIFEST).exists():  # a killed job's partial training starts over
            shutil.rmtree(checkpoints, ignore_errors=True)
            layout.log_file(scratch, f"teacher-{task}").unlink(missing_ok=True)
        scratch.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    ensure_teachers(cfg, accelerator, data, scratch, only=[task])
    if accelerator.is_main_process:
        shutil.rmtree(checkpoints, ignore_errors=True)  # the cache holds the teacher
    return str(cached)
