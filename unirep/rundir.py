"""The run directory and the Accelerator: where a run writes, and how it resumes.

``runs/<name>/`` holds ``config.yaml`` (the resolved config), ``metrics.json``, ``report.md``,
``student/``, ``checkpoints/`` and ``logs/`` (see the README's run-directory contract). Distribution
lives in one place, :func:`make_accelerator` (CPU processes use gloo; ``cpu=True`` is set where no
CUDA exists so that ``accelerate launch --multi_gpu --num_processes 2`` really shares the work).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator

from unirep.config import Config, ConfigError, cache_dir, save_config, to_dict


def make_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator: CUDA when present (unless ``cpu=true``), else CPU processes."""
    return Accelerator(
        cpu=cfg.cpu or not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision
    )


def prepare_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """``<output_dir>/<name>/``, created (or found, when resuming) with the resolved config."""
    if cfg.resume and isinstance(cfg.resume, str) and cfg.resume not in ("latest",):
        checkpoint = Path(cfg.resume)
        if not (checkpoint / "trainer_state.json").is_file():
            raise ConfigError(
                f"config key 'resume': {cfg.resume!r} is not a checkpoint folder "
                "(expected <run>/checkpoints/<phase>/step_NNNNNN/trainer_state.json)"
            )
        directory = checkpoint.parents[2]
        cfg.name = directory.name
        cfg.output_dir = str(directory.parent)
    elif cfg.resume:
        if not cfg.name:
            raise ConfigError("resume=true needs the run's name (name=<run name>) to find it")
        directory = Path(cfg.output_dir) / cfg.name
        if not directory.is_dir():
            raise ConfigError(f"resume=true but the run folder {str(directory)!r} does not exist")
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
        if (directory / "config.yaml").exists():  # a finished or interrupted run is never reused
            raise ConfigError(
                f"the run folder {str(directory)!r} already holds a run; continue it with "
                "resume=true, or choose another name= (or output_dir=)"
            )
        accelerator.wait_for_everyone()  # every process checked before the main one writes
    if cfg.resume:
        _check_same_config(cfg, directory / "config.yaml")
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        save_config(cfg, directory / "config.yaml")
    accelerator.wait_for_everyone()
    return directory


RESUME_MAY_CHANGE = {"resume", "overwrite", "name", "output_dir", "progress"}


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _check_same_config(cfg: Config, saved_path: Path) -> None:
    """A resumed run must use the config it started with (same command plus ``resume=``)."""
    if not saved_path.is_file():
        raise ConfigError(f"cannot resume: {str(saved_path)!r} does not exist")
    saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
    now = _flatten(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    changed = sorted(
        k
        for k in set(saved) | set(now)
        if k.split(".")[0] not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k)
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
        raise ConfigError(
            f"cannot resume {str(saved_path.parent)!r} with a different config ({details}); "
            "repeat the original command with resume=true"
        )


def teacher_root(cfg: Config) -> Path:
    return (
        Path(cfg.teachers.root).expanduser() if cfg.teachers.root else cache_dir(cfg) / "teachers"
    )


def resume_point(cfg: Config, checkpoint_dir: Path) -> Path | None:
    """The checkpoint named by ``resume=<dir>`` when it belongs to this phase."""
    if isinstance(cfg.resume, str) and cfg.resume not in ("latest",):
        path = Path(cfg.resume)
        if path.parent.resolve() == Path(checkpoint_dir).resolve():
            return path
    return None
