"""Checkpoints for resume: ``checkpoints/<phase>/step_NNNNNN/``, written whole or not at all.

A checkpoint holds the phase's whole trainable module (student, alignment adapters, objective and
weighting state) as safetensors, every optimizer and schedule, the trainer's record (step, best
validation score) and each process's RNG states; the data position follows from the step (the
sampler is a function of the step). It is written to a hidden temporary folder and renamed, so
a kill never leaves a half-written checkpoint; the latest ``keep`` are kept.

Nothing read back is trusted: ``trainer_state.json``, written last, records the sha256 of every
other file of the folder (each process's RNG file included) and is sealed with its own
(:func:`unirep.io.write_sealed_json`). Resume verifies them all and, when the newest checkpoint
is damaged, says so in one line and resumes from the newest intact one; with none intact it
stops in one line naming the folder. The best weights (``best.safetensors``, written between
checkpoints) are checked against the sha256 the trainer recorded when it wrote them
(:func:`check_best`) before they are loaded.

We keep this format instead of ``accelerator.save_state``: it gives the atomic rename and the
keep-k policy, stores weights as safetensors that can be read without unpickling, names the
module state by parameter (so a checkpoint can be inspected and checked strictly), and
``save_state`` would also need every prepared dataloader registered with accelerate, while our
sampler resumes from the step alone.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from unirep.errors import UnirepError
from unirep.faults import failpoint
from unirep.io import (
    file_sha256,
    load_weights,
    read_json,
    read_sealed_json,
    save_weights,
    state_mismatch,
    write_sealed_json,
)
from unirep.layout import BEST, OPTIMIZERS, STEP_PREFIX, TRAINER_STATE, WEIGHTS

STATE = TRAINER_STATE
FILES = "files"  # trainer_state.json's {file name: sha256} of the other files of its folder
RETRAIN = "delete {folder} to train the phase again, or rerun the run with overwrite=true"


def rng_file(rank: int) -> str:
    """The name of process ``rank``'s RNG states in a checkpoint folder."""
    return f"rng_{rank}.pt"


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The trainer's record of the checkpoint ``path`` once every file the record lists matches
    the sha256 written with it (the weights, the optimizers and every process's RNG states).

    Raises:
        UnirepError: ``trainer_state.json`` is missing, not JSON or does not match its own
            sha256, a recorded file is missing or differs, or the record is not of this step.
    """
    path = Path(path)
    try:
        state = read_sealed_json(path / STATE)
    except ValueError as err:
        raise UnirepError(str(err)) from None
    files = state.get(FILES)
    if not isinstance(files, dict) or not {WEIGHTS, OPTIMIZERS} <= set(files):
        raise UnirepError(f"{STATE} records no sha256 of {WEIGHTS} and {OPTIMIZERS}")
    step = state.get("step")
    if not isinstance(step, int) or (
        path.name.startswith(STEP_PREFIX) and path.name != f"{STEP_PREFIX}{step:06d}"
    ):
        raise UnirepError(f"{STATE} records step {step}")
    for name, digest in sorted(files.items()):
        if not (path / name).is_file():
            raise UnirepError(f"{name} is missing")
        if file_sha256(path / name) != digest:
            raise UnirepError(f"{name} does not match the sha256 recorded with it")
    return {k: v for k, v in state.items() if k != FILES}


def intact_checkpoint(
    directory: Path, say: Callable[[str], None] = print
) -> tuple[Path, dict[str, Any]] | None:
    """The newest ``step_*`` folder of a phase whose files are intact, and its record; None when
    the phase has none. Each newer damaged one is skipped with one line through ``say``.

    Raises:
        UnirepError: the phase has checkpoints and none is intact (one line naming the
            folder, each checkpoint and what is wrong with it).
    """
    directory = Path(directory)
    found = sorted(p for p in directory.glob(f"{STEP_PREFIX}*") if p.is_dir())
    damaged: list[tuple[str, str]] = []
    for path in reversed(found):
        try:
            state = verify_checkpoint(path)
        except UnirepError as err:
            damaged.append((path.name, str(err)))
            continue
        for name, why in damaged:
            say(f"checkpoint {directory / name} is damaged ({why}): skipped, resuming from "
                f"{path.name}")  # fmt: skip
        return path, state
    if damaged:
        listed = "; ".join(f"{name}: {why}" for name, why in damaged)
        raise UnirepError(
            f"no intact checkpoint in {directory} ({listed}): " + RETRAIN.format(folder=directory)
        )
    return None


def latest_checkpoint(directory: Path, say: Callable[[str], None] = print) -> Path | None:
    """The newest intact ``step_*`` folder of a phase, if any (:func:`intact_checkpoint`)."""
    found = intact_checkpoint(directory, say)
    return found[0] if found else None


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
    """Write ``directory/step_<step>`` atomically (every process writes its own RNG state; the
    main process records every file's sha256 in the trainer state, written last)."""
    final = Path(directory) / f"{STEP_PREFIX}{step:06d}"
    tmp = Path(directory) / f".{STEP_PREFIX}{step:06d}.tmp"
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
    mine = tmp / rng_file(accelerator.process_index)
    torch.save(rng, mine)
    hashes = [(mine.name, file_sha256(mine))]
    if accelerator.num_processes > 1:  # every process's RNG hash, to the main process
        from accelerate.utils import gather_object

        hashes = gather_object(hashes)
    if accelerator.is_main_process:
        files = dict(hashes)
        files[WEIGHTS] = save_weights(tmp / WEIGHTS, accelerator.unwrap_model(module).state_dict())
        torch.save(
            {
                "optimizers": [o.state_dict() for o in optimizers],
                "schedulers": [s.state_dict() for s in schedulers],
            },
            tmp / OPTIMIZERS,
        )
        files[OPTIMIZERS] = file_sha256(tmp / OPTIMIZERS)
        record = {**state, "step": step, "processes": accelerator.num_processes}
        write_sealed_json(tmp / STATE, {**record, FILES: dict(sorted(files.items()))})
    accelerator.wait_for_everyone()
    failpoint(f"write:{Path(directory).name}/{STEP_PREFIX}{step:06d}")
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(Path(directory).glob(f"{STEP_PREFIX}*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(
    accelerator: Any,
    path: Path,
    module: nn.Module,
    optimizers: list[Any],
    schedulers: list[Any],
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore module, optimizers and schedules from ``path``; returns the trainer's record.

    ``state``: the record :func:`intact_checkpoint` returned for ``path`` (its files verified);
    without it the folder is verified first.

    Raises:
        UnirepError: ``path`` is damaged (one line naming it and what is wrong).
    """
    path = Path(path)
    if state is None:
        try:
            state = verify_checkpoint(path)
        except UnirepError as err:
            raise UnirepError(
                f"checkpoint {path} is damaged: {err}; resume from an earlier checkpoint, or "
                "with resume=true from the newest intact one"
            ) from None
    load_fitting(
        accelerator.unwrap_model(module), load_weights(path / WEIGHTS), f"checkpoint {path}"
    )
    optim = torch.load(path / OPTIMIZERS, map_location="cpu", weights_only=False)
    for o, s in zip(optimizers, optim["optimizers"], strict=True):
        o.load_state_dict(s)
    for sch, s in zip(schedulers, optim["schedulers"], strict=True):
        sch.load_state_dict(s)
    return {k: v for k, v in state.items() if k != "processes"}


def load_fitting(module: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """``module.load_state_dict(state)``, strictly; weights that do not fit the network (written
    by another version of unirep or another config of the run) are one :class:`UnirepError`
    line naming ``where``, found before anything is loaded."""
    words = ("missing", "unexpected", "other shape")
    problems = state_mismatch(module.state_dict(), state, "network", words)
    if problems:
        raise UnirepError(f"{where} does not fit this run's network ({problems}); {_ANEW}")
    module.load_state_dict(state)


_ANEW = (
    "it was written by another version of unirep or another config of this run: continue it "
    "with that version, or start the run anew with overwrite=true"
)


def restore_rng(accelerator: Any, path: Path) -> None:
    """This process's RNG states at the checkpoint (augmentation continues identically).

    The file was verified with the checkpoint; a process the checkpoint had not (it was written
    by fewer processes) keeps its own states, and says so."""
    name = rng_file(accelerator.process_index)
    recorded = read_json(Path(path) / STATE, what="trainer state").get(FILES, {})
    if name not in recorded:
        accelerator.print(
            f"{Path(path) / name} is not part of the checkpoint (written by fewer processes): "
            "augmentation randomness will differ"
        )
        return
    rng = torch.load(Path(path) / name, map_location="cpu", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def check_best(directory: Path, expected: str | None, phase: str) -> Path:
    """``directory/best.safetensors`` once it matches the sha256 ``expected`` (recorded when it
    was written); returns its path.

    Raises:
        UnirepError: it is missing or differs (one line: the phase must be retrained).
    """
    path = Path(directory) / BEST
    if not path.is_file():
        problem = "is missing"
    elif expected is None:
        problem = "has no sha256 recorded with it"
    elif file_sha256(path) != expected:
        problem = (
            "does not match the sha256 recorded when it was written (damaged, or replaced by "
            "an interrupted run after its last checkpoint)"
        )
    else:
        return path
    raise UnirepError(
        f"[{phase}] best weights {path} {problem}: " + RETRAIN.format(folder=directory)
    )
