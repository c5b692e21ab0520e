"""Checkpoints for resume: ``checkpoints/<phase>/step_NNNNNN/``, written whole or not at all.

A checkpoint holds the phase's whole trainable module (student, alignment adapters, objective and
weighting state) as safetensors, every optimizer and schedule, the trainer's record (step, best
validation score) and each process's RNG states; the data position follows from the step (the
sampler is a function of the step). It is written to a hidden temporary folder and renamed, so
a kill never leaves a half-written checkpoint; the latest ``keep`` are kept.

We keep this format instead of ``accelerator.save_state``: it gives the atomic rename and the
keep-k policy, stores weights as safetensors that can be read without unpickling, names the
module state by parameter (so a checkpoint can be inspected and checked strictly), and
``save_state`` would also need every prepared dataloader registered with accelerate, while our
sampler resumes from the step alone.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unirep.faults import failpoint
from unirep.io import atomic_write_json, load_weights, read_json, save_weights
from unirep.layout import OPTIMIZERS, TRAINER_STATE, WEIGHTS

STATE = TRAINER_STATE


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete ``step_*`` folder of a phase, if any."""
    steps = sorted(Path(directory).glob(f"step_*/{STATE}"))
    return steps[-1].parent if steps else None


def save_checkpoint(
    accelerator: Any,
    directory: Path,
    step: int,
    module: nn.Module,
    optimizers: list[Any],
    schedulers: list[Any],
    state: dict[str, Any],
    keep: int,
) -> None:
    """Write ``directory/step_<step>`` atomically (every process writes its own RNG state)."""
    final = Path(directory) / f"step_{step:06d}"
    tmp = Path(directory) / f".step_{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(rng, tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_weights(tmp / WEIGHTS, accelerator.unwrap_model(module).state_dict())
        torch.save(
            {
                "optimizers": [o.state_dict() for o in optimizers],
                "schedulers": [s.state_dict() for s in schedulers],
            },
            tmp / OPTIMIZERS,
        )
        atomic_write_json(tmp / STATE, {**state, "step": step})
    accelerator.wait_for_everyone()
    failpoint(f"write:{Path(directory).name}/step_{step:06d}")
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(Path(directory).glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(
    accelerator: Any,
    path: Path,
    module: nn.Module,
    optimizers: list[Any],
    schedulers: list[Any],
) -> dict[str, Any]:
    """Restore module, optimizers and schedules from ``path``; returns the trainer's record."""
    state = read_json(path / STATE, what="trainer state")
    accelerator.unwrap_model(module).load_state_dict(load_weights(path / WEIGHTS))
    optim = torch.load(path / OPTIMIZERS, map_location="cpu", weights_only=False)
    for o, s in zip(optimizers, optim["optimizers"], strict=True):
        o.load_state_dict(s)
    for sch, s in zip(schedulers, optim["schedulers"], strict=True):
        sch.load_state_dict(s)
    return state


def restore_rng(accelerator: Any, path: Path) -> None:
    """This process's RNG states at the checkpoint (augmentation continues identically)."""
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    if not rng_file.exists():
        accelerator.print(f"{rng_file} is missing: augmentation randomness will differ")
        return
    rng = torch.load(rng_file, map_location="cpu", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
