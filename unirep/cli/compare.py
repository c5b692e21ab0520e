"""Variants × seeds on one preset, then one table (mean ± std over seeds) and a plot.

    accelerate launch scripts/compare.py --config mini-scenes-onelabel --seeds 0,1,2 \
        [--variants "supervised distill mtpsl jtr distill+best-of:mtpsl,jtr" | xtask | sharing] \
        [--name NAME] \
        [--reference supervised] [--jobs 2] [key=value ...]
    unirep compare ...                                            (the installed equivalent)

Each (variant, seed) runs the whole stage-two recipe (teachers, student, evaluation) into
``<output_dir>/<name>/<variant>-seed<k>/`` (with ``baseline=false``: the reference variant plays
that part); a finished run is read back, so the command resumes an interrupted comparison.
Variants, separated by spaces, are names of the partial-label comparison (``supervised``: the
multi-task model on the same labels, no distillation; ``distill``; ``mtpsl``; ``jtr``;
``distill+best-of:mtpsl,jtr``: distillation plus whichever of the two scored better on
validation), the cross-task ablation's (``--variants xtask``: ``distill``, ``+consistency``,
``+alignment``, ``+cycle``, ``+contrastive``, ``+contrastive-distill`` and ``combine:...``, the
terms that beat distillation alone on validation, together), the task-balancing comparison's
(``--variants balance``: ``sum``, ``uncertainty``, ``dwa``, ``famo``, ``mgda_ub``, ``pcgrad``,
``cagrad``, ``nash_mtl``, ``adatask``, ``distill``, ``distill+best-of:...`` and ``front``, a sweep
of static task weights drawn as the scalarisation front every method is plotted against, in
``front.png``), the student architectures' (``--variants sharing``: ``shared``, the
shared-encoder student and reference, ``shared-plain``, ``smtl``, ``smtl-plain``,
``smtl-private``, ``smtl-sigmoid``, ``smtl-lite``, ``smtl-lite-plain``, ``smtl-after``,
``shared-wide``, ``shared-wide-plain``, ``pdf``, ``pdf-plain``, ``automtl`` and
``automtl-plain``;
``-plain``: without distillation; the table adds the exported student's parameters, its
milliseconds per image and the student phase's seconds), or ``name=key=value;key=value``.
The table and plot go to ``<output_dir>/<name>/comparison.{md,json,png}`` (default name
``compare-<preset>``, or ``compare-xtask-<preset>`` for ``--variants xtask``), with what this
invocation cost.

``--jobs N`` runs N runs side by side in worker processes, each at this process's thread count
(``accelerate launch`` on a CPU: one), the teachers first (one job per teacher the cache lacks,
shared by the runs that need it): on a 2-core machine ``--jobs 2`` keeps both cores busy. The
numbers are those of ``--jobs 1`` at the same thread count.
"""

from __future__ import annotations

import sys
from functools import partial

import unirep.layout as layout
from unirep.cli import OPTIONS as CLI_OPTIONS
from unirep.cli.args import parse_command, run, split_args
from unirep.errors import ConfigError
from unirep.experiments.compare import (
    FRONT,
    VARIANT_SETS,
    Runners,
    expand_front,
    parse_variants,
    run_comparison,
    run_tasks,
    write_comparison,
)
from unirep.pipeline.api import run_recipe, train_teacher_job
from unirep.pipeline.rundir import make_accelerator

RUNNERS = Runners(run=run_recipe, teacher=train_teacher_job)
OPTIONS = CLI_OPTIONS["compare"]
PROG = "unirep compare"


def main(prog: str = PROG) -> None:
    base, options = parse_command(prog=prog, options=OPTIONS)  # checked up front
    preset, _, overrides = split_args(sys.argv[1:], prog, OPTIONS)
    seeds = _integers(options.get("--seeds", "0,1,2"), "--seeds", prog)
    workers = _integers(options.get("--jobs", "1"), "--jobs", prog)[0]
    if workers < 1:
        raise ConfigError(f"{prog}: --jobs must be a positive integer, got {workers}")
    spec = options.get("--variants", "partial")
    variants = parse_variants(spec.split())
    if any(v.name == FRONT for v in variants):  # the static-weight sweep over the run's tasks
        variants = expand_front(variants, run_tasks(preset, overrides))
    reference = options.get("--reference", variants[0].name)
    if reference not in {v.name for v in variants}:
        raise ConfigError(f"{prog}: --reference {reference!r} is not one of the variants")
    default = f"compare-{spec}-{base.preset}" if spec in VARIANT_SETS and spec != "partial" else ""
    name = options.get("--name", default or f"compare-{base.preset}")
    accelerator = make_accelerator(base)
    if workers > 1 and accelerator.num_processes > 1:
        raise ConfigError(
            f"{prog}: --jobs runs one-process runs side by side; launch it with one process "
            f"(this launch has {accelerator.num_processes})"
        )
    folder, results, notes, cost = run_comparison(
        preset, variants, seeds, name, overrides, RUNNERS, workers, accelerator.print, reference
    )
    if accelerator.is_main_process:
        write_comparison(folder, base.preset, seeds, results, reference, notes, cost)
        print((folder / layout.COMPARISON).read_text())


def _integers(text: str, option: str, prog: str = PROG) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s]
    except ValueError:
        raise ConfigError(f"{prog}: {option} takes integers (e.g. 0,1,2), got {text!r}") from None
    if not values:
        raise ConfigError(f"{prog}: {option} is empty")
    return values


def cli(prog: str = PROG) -> None:
    """The console entry point (``unirep compare``; the script passes its own name)."""
    run(partial(main, prog), prog)
