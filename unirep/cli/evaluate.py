"""Evaluate an exported student on a split; writes metrics.json in the run-directory format.

    unirep evaluate --config PRESET --student runs/<run>[/student] [split=test] [key=value ...]
    accelerate launch scripts/evaluate.py --config PRESET --student runs/<run> split=val

The student's images are preprocessed as its manifest records (not as the ``--config`` says).
Results go to a new run folder, ``<output_dir>/eval-<run>-<split>`` (``-2``, ``-3``, ... when
that exists) or the ``name=`` given on the command line; never into the training run, even when
``--config`` is that run's own ``config.yaml``.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import unirep.layout as layout
from unirep.cli.args import parse_command, run
from unirep.config.schema import Config
from unirep.errors import ConfigError
from unirep.pipeline.rundir import check_output_dir, make_accelerator, prepare_run_dir
from unirep.pipeline.stage_two import evaluate_student, matching_tasks, resolve_data
from unirep.pipeline.student import load_student

PROG = "unirep evaluate"


def output_name(cfg: Config, student_dir: Path, argv: list[str]) -> str:
    """The evaluation's run name: ``name=`` from the command line, else a fresh ``eval-`` one."""
    training_run = student_dir.resolve().parent
    if any(a.startswith("name=") for a in argv):
        assert cfg.name
        if (Path(cfg.output_dir) / cfg.name).resolve() == training_run:
            raise ConfigError(
                f"config key 'name': {cfg.name!r} is the student's training run; an evaluation "
                "never writes into it (choose another name=)"
            )
        return cfg.name
    base = f"eval-{training_run.name}-{cfg.split}"
    name, n = base, 1
    while (Path(cfg.output_dir) / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def main(prog: str = PROG) -> None:
    cfg, options = parse_command(prog=prog, options=("--student",))
    if "--student" not in options:
        raise ConfigError(f"{prog}: set --student PATH (a run folder or its student/ folder)")
    student_dir = Path(options["--student"]).expanduser()
    if layout.student_dir(student_dir).is_dir():
        student_dir = layout.student_dir(student_dir)
    if not (student_dir / layout.STUDENT_MANIFEST).is_file():
        raise ConfigError(f"--student: {str(student_dir)!r} holds no student manifest.json")
    # a damaged student (manifest, hash, format, architecture, edited tasks) fails first
    student = load_student(student_dir)
    cfg.resume, cfg.overwrite = False, False  # an evaluation always writes a new folder
    accelerator = make_accelerator(cfg)
    names = [output_name(cfg, student_dir, sys.argv[1:])]
    if accelerator.num_processes > 1:  # every process must agree on the folder
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(names)
    cfg.name = names[0]
    check_output_dir(Path(cfg.output_dir) / cfg.name)  # writable, free space: before the data
    data = resolve_data(cfg, accelerator)  # bad data fails before anything is written
    matching_tasks(student.tasks, data.tasks(), str(student_dir))  # ... and tasks it lacks
    del student  # evaluate_student loads it again, onto the accelerator's device
    run_dir = prepare_run_dir(cfg, accelerator)
    metrics = evaluate_student(cfg, accelerator, data, run_dir, student_dir)
    for task, entry in metrics["tasks"].items():
        values = ", ".join(f"{k} {v:.4f}" for k, v in entry["student"].items() if v is not None)
        accelerator.print(f"{task}: {values or 'not measured (unlabelled split)'}")
    accelerator.print(f"metrics: {run_dir / layout.METRICS}")
    accelerator.end_training()


def cli(prog: str = PROG) -> None:
    """The console entry point (``unirep evaluate``; the script passes its own name)."""
    run(partial(main, prog), prog)
