"""The run directory and the Accelerator: where a run writes, and how it resumes.

``runs/<name>/`` holds ``config.yaml`` (the resolved config), ``metrics.json``, ``report.md``,
``student/``, ``checkpoints/`` and ``logs/`` (see the README's run-directory contract). Distribution
lives in one place, :func:`make_accelerator` (CPU processes use gloo; ``cpu=True`` is set where no
CUDA exists so that ``accelerate launch --multi_gpu --num_processes 2`` really shares the work),
with the experiment trackers of ``log_with``, which :func:`prepare_run_dir` starts in ``logs/``
once the run's folder is known (:func:`start_trackers`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs

import unirep.layout as layout
from unirep.config.load import flatten, save_config, to_dict
from unirep.config.schema import Config
from unirep.errors import ConfigError
from unirep.io import atomic_write_json, clean_partial, read_json
from unirep.training.tracking import PROJECT, tracker_names
from unirep.weighting import WEIGHTINGS

CONFIG = layout.CONFIG
MIN_FREE_MIB = 100
"""The free space (MiB) a run's output folder must have before any work starts."""


def make_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator: CUDA when present (unless ``cpu=true``), else CPU processes; DDP
    told to expect unused parameters when the weighting's steps may leave some (``alternating``);
    the trackers of ``log_with`` (a missing package is a :class:`ConfigError` naming its extra).

    The trackers start in :func:`prepare_run_dir`: the run's folder may not be named yet (its
    name is drawn with this accelerator), so the logging folder given here, ``output_dir``, is
    only a placeholder that :func:`start_trackers` replaces with ``<run>/logs``."""
    handlers = []
    if getattr(WEIGHTINGS.get(cfg.weighting.name), "leaves_parameters_unused", False):
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    trackers = tracker_names(cfg.log_with)
    return Accelerator(
        cpu=cfg.cpu or not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        kwargs_handlers=handlers,
        log_with=trackers or None,
        project_dir=cfg.output_dir if trackers else None,
    )


def start_trackers(cfg: Config, accelerator: Accelerator, run_dir: Path) -> None:
    """Start the accelerator's experiment trackers (``log_with``; none: nothing to do) for the
    run in ``run_dir``: TensorBoard event files in ``<run_dir>/logs/unirep/``, a wandb run named
    after the run with its files in ``<run_dir>/logs/wandb/``, an MLflow run of that name (where
    ``MLFLOW_TRACKING_URI`` points); each gets the resolved config, flattened, as hyper-parameters.

    Main process only (accelerate's ``init_trackers``); an accelerator whose trackers already
    started keeps them. A resumed run starts them again: TensorBoard adds an event file beside
    the first, wandb and MLflow a new run of the same name.
    """
    if not accelerator.log_with or accelerator.trackers:
        return
    logs = Path(run_dir) / layout.LOGS
    accelerator.project_configuration.logging_dir = str(logs)
    if accelerator.is_main_process:
        logs.mkdir(parents=True, exist_ok=True)
    init_kwargs = {"wandb": {"name": cfg.name, "dir": str(logs)}, "mlflow": {"run_name": cfg.name}}
    accelerator.init_trackers(PROJECT, config=tracker_config(cfg), init_kwargs=init_kwargs)


def stop_trackers(accelerator: Accelerator) -> None:
    """Finish the accelerator's trackers (TensorBoard's files closed, the wandb and MLflow runs
    ended) without the rest of ``end_training`` (which also ends the process group): for callers
    that run several runs in one process, each with its own trackers."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def tracker_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as the trackers' hyper-parameters: one entry per dotted key (e.g.
    ``train.optim.optimizer.kwargs.lr``), lists and empty sections as JSON text (TensorBoard takes
    only numbers, strings, booleans and ``None``)."""
    flat = flatten(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    return {
        k: v if v is None or isinstance(v, bool | int | float | str) else json.dumps(v)
        for k, v in flat.items()
    }


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself when something is there (a folder, a file, a dangling link), else its
    nearest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not (path.exists() or path.is_symlink()) and path.parent != path:
        path = path.parent
    return path


def check_output_dir(directory: Path, min_free_mib: int = MIN_FREE_MIB) -> None:
    """Refuse, before any work, a run folder ``directory`` that cannot be written: a path
    component that is a file, a folder that is read-only (tried with a temporary file), or less
    than ``min_free_mib`` MiB free there. A :class:`ConfigError` names ``output_dir``, the path and
    what to do; nothing is created."""
    directory = Path(directory)
    found = _existing_ancestor(directory)
    choose = "choose another output_dir= (or name=)"
    if not found.is_dir():
        what = "a dangling link" if not found.exists() else "a file"
        below = "" if found == Path(os.path.abspath(directory)) else f" ({str(directory)!r})"
        raise ConfigError(
            f"config key 'output_dir': {str(found)!r} is {what}, not a folder, so the run folder"
            f"{below} cannot be created; move it away or {choose}"
        )
    try:
        fd, probe = tempfile.mkstemp(dir=found, prefix=".unirep-write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"config key 'output_dir': cannot write in {str(found)!r} "
            f"({err.strerror or err}); make it writable or {choose}"
        ) from None
    free = shutil.disk_usage(found).free
    if free < min_free_mib * 2**20:
        raise ConfigError(
            f"config key 'output_dir': only {free / 2**20:.0f} MiB free in {str(found)!r} (a run "
            f"needs at least {min_free_mib} MiB); free some space or {choose}"
        )


_HELD: dict[Path, Any] = {}
"""The run-folder locks this process holds (open files), kept until it exits."""


def lock_run_dir(directory: Path) -> None:
    """Hold, for the life of this process, the lock of the run folder ``directory`` (a hidden
    file beside it, so that ``overwrite=true`` keeps it): a second run with the same name, or a
    ``resume=true`` while the run still goes on, is refused in one line instead of writing into
    the same folder."""
    import fcntl

    directory = Path(directory)
    if directory in _HELD:
        return
    path = directory.parent / f".{directory.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(
            f"the run folder {str(directory)!r} is in use by another unirep process; wait for "
            "it to finish (then resume=true if it stopped), or choose another name="
        ) from None
    _HELD[directory] = handle


def release_run_dir(directory: Path) -> None:
    """Give up the lock of :func:`lock_run_dir` (the run in this process is over)."""
    handle = _HELD.pop(Path(directory), None)
    if handle is not None:
        handle.close()


def prepare_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """``<output_dir>/<name>/``, created (or found, when resuming) with the resolved config."""
    if cfg.resume and isinstance(cfg.resume, str) and cfg.resume not in ("latest",):
        checkpoint = Path(cfg.resume)
        if not (checkpoint / layout.TRAINER_STATE).is_file():
            raise ConfigError(
                f"config key 'resume': {cfg.resume!r} is not a checkpoint folder "
                "(expected <run>/checkpoints/<phase>/step_NNNNNN/trainer_state.json)"
            )
        directory = checkpoint.parents[2]
        cfg.name = directory.name
        cfg.output_dir = str(directory.parent)
        check_output_dir(directory)
        if accelerator.is_main_process:
            lock_run_dir(directory)
    elif cfg.resume:
        if not cfg.name:
            raise ConfigError("resume=true needs the run's name (name=<run name>) to find it")
        directory = Path(cfg.output_dir) / cfg.name
        if not directory.is_dir():
            raise ConfigError(f"resume=true but the run folder {str(directory)!r} does not exist")
        check_output_dir(directory)
        if accelerator.is_main_process:
            lock_run_dir(directory)
    else:
        if not cfg.name:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            # every process must agree on the name: take the main process's
            names = [f"{cfg.preset}-{stamp}"]
            if accelerator.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(names)
            cfg.name = names[0]
        directory = Path(cfg.output_dir) / cfg.name
        check_output_dir(directory)  # writable, a folder, free space: before any work
        if accelerator.is_main_process:
            lock_run_dir(directory)
        held = (directory / CONFIG).exists()
        if held and not cfg.overwrite:  # a finished or interrupted run is never reused
            raise ConfigError(
                f"the run folder {str(directory)!r} already holds a run; continue it with "
                "resume=true, replace it with overwrite=true, or choose another name= "
                "(or output_dir=)"
            )
        # a kill before config.yaml was written leaves only temporary files behind
        found = list(directory.iterdir()) if directory.is_dir() else []
        if not held and any(not p.name.endswith(".tmp") for p in found):
            raise ConfigError(
                f"{str(directory)!r} exists and is not a unirep run folder (no {CONFIG}); "
                "choose another name= or output_dir="
            )
        accelerator.wait_for_everyone()  # every process checked before the main one writes
        if held and accelerator.is_main_process:  # overwrite=true
            shutil.rmtree(directory)
        elif directory.is_dir() and accelerator.is_main_process:
            clean_partial(directory)
    if cfg.resume:
        check_same_config(cfg, directory / CONFIG)  # and it stays as written at the start
        if accelerator.is_main_process:
            clean_partial(directory)
    elif accelerator.is_main_process:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            save_config(cfg, directory / CONFIG)
        except OSError as err:  # e.g. the folder changed since check_output_dir
            raise ConfigError(
                f"config key 'output_dir': cannot write the run folder {str(directory)!r} "
                f"({err.strerror or err}); make it writable or choose another output_dir="
            ) from None
    accelerator.wait_for_everyone()
    if not run_finished(directory):  # a finished run is only read back: no empty tracker runs
        start_trackers(cfg, accelerator, directory)
    return directory


def forget_unstarted_run(run_dir: Path) -> bool:
    """Remove ``run_dir`` when nothing was trained in it yet (no file under its checkpoints: only
    the config, empty logs), so that the same command, once fixed, starts afresh rather than
    being refused as an existing run. Returns whether it was removed."""
    checkpoints = Path(run_dir) / layout.CHECKPOINTS
    if checkpoints.exists() and any(p.is_file() for p in checkpoints.rglob("*")):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def run_finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` finished: its ``metrics.json`` is written last."""
    return (Path(run_dir) / layout.METRICS).is_file()


RESUME_MAY_CHANGE = {"resume", "overwrite", "name", "output_dir", "progress", "log_with",
                     "data.memory_cache_mib"}  # fmt: skip
"""Keys a resumed (or read back) run may change: where it goes, how fast it reads and which
trackers watch it, not what it computes (dotted keys name one setting, plain ones a whole
section)."""


def _may_change(key: str) -> bool:
    return key.split(".")[0] in RESUME_MAY_CHANGE or key in RESUME_MAY_CHANGE


def _is_default(cfg: Config, key: str) -> bool:
    """Whether ``key`` (dotted) holds its dataclass default in ``cfg``: a config key added after a
    run was saved, at the default (which keeps the old behaviour), does not make it different."""
    *path, name = key.split(".")
    owner: Any = cfg
    for part in path:
        owner = owner.get(part) if isinstance(owner, dict) else getattr(owner, part, None)
    if not dataclasses.is_dataclass(owner) or isinstance(owner, type):
        return False
    try:
        default = getattr(type(owner)(), name)
    except (TypeError, AttributeError):
        return False
    return _plain(default) == _plain(getattr(owner, name))


def _plain(value: Any) -> Any:
    """A config value as its YAML form (dataclasses as dicts)."""
    return yaml.safe_load(
        yaml.safe_dump(to_dict(value) if dataclasses.is_dataclass(value) else value)
    )


def check_same_config(cfg: Config, saved_path: Path, finished: bool = False) -> None:
    """A resumed run must use the config it started with (same command plus ``resume=``), and a
    finished run is only read back (``finished``) for the config that produced it."""
    if not saved_path.is_file():
        raise ConfigError(f"cannot resume: {str(saved_path)!r} does not exist")
    saved = flatten(yaml.safe_load(saved_path.read_text()) or {})
    now = flatten(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    changed = sorted(
        k
        for k in set(saved) | set(now)
        if not _may_change(k)
        and saved.get(k) != now.get(k)
        and not (k not in saved and _is_default(cfg, k))  # a key added later, at its default
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
        if finished:
            raise ConfigError(
                f"{str(saved_path.parent)!r} finished with a different config ({details}); "
                "choose another name (or output_dir), or delete that run"
            )
        raise ConfigError(
            f"cannot resume {str(saved_path.parent)!r} with a different config ({details}); "
            "repeat the original command with resume=true"
        )


def resume_point(cfg: Config, checkpoint_dir: Path) -> Path | None:
    """The checkpoint named by ``resume=<dir>`` when it belongs to this phase."""
    if isinstance(cfg.resume, str) and cfg.resume not in ("latest",):
        path = Path(cfg.resume)
        if path.parent.resolve() == Path(checkpoint_dir).resolve():
            return path
    return None


def stored(
    path: Path,
    accelerator: Accelerator,
    compute: Any,
    main_only: bool = False,
    what: str = "stored evaluation",
) -> Any:
    """``compute()`` once: its JSON result is kept at ``path`` and read back on resume, so a
    finished evaluation (or measurement) is never recomputed (every process reads the same
    file). ``main_only``: only the main process computes, and every process returns the file's
    content, so all use the same record bit for bit."""
    found = path.is_file()
    # every process has looked before the main one may write: otherwise a slower process could
    # find the new file, skip the barrier below and leave the main process waiting at it
    accelerator.wait_for_everyone()
    if found:
        return read_json(path, what=what)
    value = compute() if accelerator.is_main_process or not main_only else None
    if accelerator.is_main_process:
        atomic_write_json(path, value)
    accelerator.wait_for_everyone()
    return read_json(path, what=what) if main_only else value
