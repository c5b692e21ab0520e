"""Time the real training step against a minimal loop; split a phase into its parts.

    python scripts/benchmark.py [--steps N] [--warmup N] [--json PATH] [--run-dir DIR]
        [--untrained-teachers] [--joint-scaling | --term-costs | --options | --variants SET |
        --weightings[=NAMES] [--with-distill] | --paths] [--config PRESET_OR_PATH] [key=value ...]
    unirep benchmark ...                                          (the installed equivalent)

For the baseline and the distilled student of the config (any preset, any ``weighting=``), times
``unirep.training.trainer.train_step`` (what ``fit`` runs) split into data / teachers / step, one
validation pass and one checkpoint write, beside a hand-written torch loop on the same network
and batches; prints markdown tables and the projected split of a whole phase
(see :mod:`unirep.experiments.benchmark`). Run it with ``python`` (one process); each measurement
runs in a fresh process of its own.

Flags (read before the config arguments): ``--steps`` timed steps (default 20), ``--warmup``
untimed steps first (default 3), ``--json`` writes every figure there, ``--run-dir`` keeps the
benchmark's teachers there (default: a temporary folder), ``--untrained-teachers`` times with
untrained teachers (same cost, no training; say so where you quote the numbers),
``--joint-scaling`` only times the partial-label joint terms (MTPSL, JTR) against the number of
tasks (random inputs, 8 images of 48×64; no config needed), ``--term-costs`` only times the
student's real step with distillation alone, then + each cross-task / contrastive term of the
ablation (``scripts/compare.py --variants xtask``) and + all of them, ``--options`` only times
the student's real step with each speed option on against all off
(``unirep.experiments.benchmark.OPTION_VARIANTS``: channels_last, compile, bf16, batched teachers,
teachers in bf16), on CUDA when present, ``--sharing`` only times the distilled student's real
step with each student architecture of ``scripts/compare.py --variants sharing`` (SMTL's gates)
against the shared-encoder student, ``--variants SET`` the same for any comparison set of
``scripts/compare.py`` (``--sharing`` is ``--variants sharing``, ``--pruning`` ``--variants
pruning``: each DiSparse mode against the dense student, the step with its masked gradients,
and the dynamic mode updating its masks on every step, a forward and one backward per task, the
cost of one update that ``interval`` spreads; the masks' content does not change the dense
compute; ``saliency``: SRDML; ``overlap``: the pruned auxiliary network's joint step with its
auxiliary loss against plain multi-task learning, on ``--config mini-decathlon-overlap``),
``--paths`` only times each gradient method whose weights depend on the Gramian alone on its
Jacobian path and on its Gramian path (``weighting.kwargs.path``), at T = 3 and T = 10 tasks of
a synthetic MLP (step ms and step peak MiB, each cell in a fresh process; ``--weightings=NAMES``
picks the methods; ``--steps`` / ``--warmup`` apply), which ``--weightings`` also prints after
its table; ``--weightings`` only times the
student's real step under each task-balancing method (``unirep.weighting``; NAMES:
comma-separated registry names, ``imtl`` for its three modes or ``imtl-l`` / ``-g`` / ``-h``;
default
``unirep.experiments.benchmark.WEIGHTING_METHODS``), the methods alternated step by step in one
process, against ``sum``, with the backward passes through the trunk each needs; distillation is
off (the plain multi-task model) unless ``--with-distill``, and methods whose optional solvers
are missing (``unirep[solvers]``) are skipped with a note, e.g.
``python scripts/benchmark.py --config mini-scenes-balance --weightings``. Otherwise (and with
``--with-distill``) the config's teachers are used when they verify, else trained into the run
dir with the config's teacher recipe, which overrides can shorten, e.g.
``teachers.train.max_steps=50``. ``--json`` writes the rows of the table of each mode. Where CUDA
is present, the default benchmark ends with a GPU section: its table on CUDA (measured again
there if ``cpu=true``) and the ``--options`` rows on CUDA (in the JSON under ``gpu``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from unirep.cli.args import parse_args, run
from unirep.config.schema import Config
from unirep.data.streams import RunData
from unirep.errors import ConfigError
from unirep.experiments.benchmark import (
    OPTION_VARIANTS,
    format_joint_scaling,
    format_report,
    format_term_costs,
    format_weighting_costs,
    joint_term_scaling,
    run_benchmark,
    teacher_config,
    term_costs,
    weighting_configs,
    weighting_costs,
)
from unirep.experiments.compare import FRONT, VARIANT_SETS, XTASK_VARIANTS
from unirep.pipeline.rundir import make_accelerator
from unirep.pipeline.stage_two import resolve_data
from unirep.stage_one.train import ensure_teachers

PROG = "unirep benchmark"


def split_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the benchmark's flags, the arguments left for ``unirep.cli.args.parse_args``)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--untrained-teachers", action="store_true")
    parser.add_argument("--joint-scaling", action="store_true")
    parser.add_argument("--term-costs", action="store_true")
    parser.add_argument("--options", action="store_true")
    parser.add_argument("--sharing", action="store_true")
    parser.add_argument("--pruning", action="store_true")
    parser.add_argument("--variants", metavar="SET")
    parser.add_argument("--weightings", nargs="?", const="", metavar="NAMES")
    parser.add_argument("--with-distill", action="store_true")
    parser.add_argument("--paths", action="store_true")
    flags, rest = parser.parse_known_args(argv)
    if flags.weightings and "=" in flags.weightings:  # a config override, not a list of names
        rest.insert(0, flags.weightings)
        flags.weightings = ""
    return flags, rest


def _with_teachers(
    cfg: Config, flags: argparse.Namespace, tmp: Path, run: tuple[Any, RunData] | None = None
) -> tuple[Config, str, tuple[Any, RunData]]:
    """(config whose teacher root holds the benchmark's teachers, where they come from, its
    accelerator and data, ``run`` when given): the config's own teachers when they verify, else
    teachers trained into ``--run-dir`` (default ``tmp``); none with ``--untrained-teachers``."""
    run_dir = flags.run_dir or tmp
    accelerator, data = run or _resolved(cfg)
    source = "untrained (random weights)"
    if not flags.untrained_teachers:
        cfg, source = teacher_config(cfg, data, run_dir)
        ensure_teachers(cfg, accelerator, data, run_dir)
    return cfg, source, (accelerator, data)


def _resolved(cfg: Config) -> tuple[Any, RunData]:
    accelerator = make_accelerator(cfg)
    return accelerator, resolve_data(cfg, accelerator)


def _configs(rest: list[str], variants: dict[str, list[str]]) -> dict[str, Config]:
    """The run's config with each variant's overrides after its own."""
    return {name: parse_args([*rest, *o], prog=PROG) for name, o in variants.items()}


def _use_teachers(configs: Iterable[Config | str], root: str) -> None:
    """Point every config (not the notes of skipped methods) at the teachers in ``root``."""
    for c in configs:
        if isinstance(c, Config):
            c.teachers.root = root


def _report_rows(
    rows: dict[str, dict[str, Any]],
    table: str,
    source: str,
    flags: argparse.Namespace,
    note: str = "",
) -> None:
    """The rows' device line (and ``note``) and table; the rows as JSON to ``--json``."""
    first = next(r for r in rows.values() if "device" in r)
    print(f"teachers: {source}; device {first['device']}, {first['threads']} thread(s), "
          f"{flags.steps} steps after {flags.warmup} warm-up{note}")  # fmt: skip
    print(table)
    if flags.json:
        flags.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {flags.json}")


def _weightings(cfg: Config, flags: argparse.Namespace) -> None:
    """The student's step under each task-balancing method, alternated, against ``sum``."""
    run = _resolved(cfg)
    names = [n.strip() for n in flags.weightings.split(",") if n.strip()] or None
    tasks = list(run[1].tasks())
    configs = weighting_configs(cfg, tasks, names, flags.with_distill)
    base = next(iter(configs.values()))  # sum, the reference: it needs no solver
    assert isinstance(base, Config)
    source = "none (distillation off)"
    with tempfile.TemporaryDirectory(prefix="unirep-bench-") as tmp:
        if base.distill.enabled or (base.classification and base.classification.init_from_teacher):
            base, source, run = _with_teachers(base, flags, Path(tmp), run)
            _use_teachers(configs.values(), base.teachers.root)
        rows = weighting_costs(configs, flags.steps, flags.warmup, flags.untrained_teachers,
                               data=run[1], accelerator=run[0])  # fmt: skip
    note = (f"; T = {len(tasks)} tasks; the methods alternated step by step in one process; "
            "task diagnostics off; ratios of the medians")  # fmt: skip
    _report_rows(rows, format_weighting_costs(rows), source, flags, note)
    _paths(names, flags)


def _paths(names: list[str] | None, flags: argparse.Namespace) -> None:
    """Each Gramian-only method's Jacobian and Gramian paths at T = 3 and 10 (a synthetic
    T-task model, :mod:`unirep.experiments.gramian_costs`)."""
    from unirep.experiments.gramian_costs import GRAMIAN_METHODS, format_path_costs, path_costs

    wanted = [n for n in names if n in GRAMIAN_METHODS] if names else None
    if wanted == []:
        return
    print("\n## Jacobian vs Gramian path (synthetic T-task MLP, each cell in its own process)\n")
    print(format_path_costs(path_costs(wanted, steps=flags.steps, warmup=flags.warmup)))


def _side_by_side(
    cfg: Config, rest: list[str], flags: argparse.Namespace, variants: dict[str, list[str]]
) -> tuple[dict[str, dict[str, Any]], str]:
    """(rows, where the teachers come from): the student's real step under each variant's
    overrides, each in a fresh process, against the first
    (:func:`unirep.experiments.benchmark.term_costs`)."""
    configs = _configs(rest, variants)
    with tempfile.TemporaryDirectory(prefix="unirep-bench-") as tmp:
        cfg, source, _ = _with_teachers(cfg, flags, Path(tmp))
        _use_teachers(configs.values(), cfg.teachers.root)
        rows = term_costs(configs, flags.steps, flags.warmup, flags.untrained_teachers)
    return rows, source


def benchmark_variants(name: str) -> dict[str, list[str]]:
    """The variants of the comparison set ``name`` (:data:`unirep.experiments.compare.
    VARIANT_SETS`) whose step ``--variants`` times: every one but the ``-plain`` twins (the same
    step without the teachers) and the derived ones; ``pruning`` adds the dynamic DiSparse mode
    updating its masks on every step (the cost of one update, which ``interval`` spreads)."""
    if name not in VARIANT_SETS:
        raise ConfigError(f"--variants {name!r}: valid sets are {', '.join(VARIANT_SETS)}")
    variants = {
        n: o
        for n, o in VARIANT_SETS[name].items()
        if not n.endswith("-plain") and ":" not in n and n != FRONT  # no best-of:, combine:
    }
    if name == "pruning":
        variants["disparse-dynamic-90 every step"] = [
            "dense.sharing={name: disparse, kwargs: {mode: dynamic, sparsity: 0.9, interval: 1, "
            "end: 1.0}}"
        ]
    return variants


def _term_costs(cfg: Config, rest: list[str], flags: argparse.Namespace) -> None:
    """The student's step with distillation alone, then with each cross-task / contrastive
    term of the ablation (:data:`unirep.experiments.compare.XTASK_VARIANTS`), side by side."""
    variants = {n: o for n, o in XTASK_VARIANTS.items() if not n.startswith("combine:")}
    every = [o for n, over in XTASK_VARIANTS.items() for o in over if n != "distill"]
    variants["+all terms"] = list(dict.fromkeys(every))
    rows, source = _side_by_side(cfg, rest, flags, variants)
    _report_rows(rows, format_term_costs(rows), source, flags)


def _gpu_section(cfg: Config, rest: list[str], flags: argparse.Namespace) -> dict[str, Any]:
    """Where CUDA is present: the benchmark's table on it (measured again if the main one ran
    with ``cpu=true``) and each speed option on vs off there; returns both for the JSON."""
    print(f"\n## GPU section ({torch.cuda.get_device_name()})\n")
    gpu: dict[str, Any] = {}
    if cfg.cpu:
        gpu = _default_benchmark(parse_args([*rest, "cpu=false"], prog=PROG), flags)
    rows, _ = _side_by_side(cfg, [*rest, "cpu=false"], flags, OPTION_VARIANTS)
    print(format_term_costs(rows))
    return {**gpu, "options": rows}


def _default_benchmark(cfg: Config, flags: argparse.Namespace) -> dict[str, Any]:
    """Both modes, both loops (the main table), printed; returns the results."""
    cfg, source, (accelerator, data) = _with_teachers(cfg, flags, flags.run_dir)
    print(f"teachers: {source}")
    results = run_benchmark(
        cfg, flags.steps, flags.warmup, flags.untrained_teachers, data=data,
        accelerator=accelerator,
    )  # fmt: skip
    results["info"]["teachers"] = source
    print(format_report(results))
    return results


def main(prog: str = PROG) -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return
    flags, rest = split_flags(sys.argv[1:])
    if flags.joint_scaling:  # the partial-label joint terms' cost against the number of tasks
        print(format_joint_scaling(joint_term_scaling()))
        return
    if flags.paths:  # the gradient methods' two paths on a synthetic model (no config needed)
        names = [n.strip() for n in (flags.weightings or "").split(",") if n.strip()] or None
        _paths(names, flags)
        return
    cfg = parse_args(rest, prog=prog)
    if flags.term_costs:
        _term_costs(cfg, rest, flags)
        return
    chosen = "sharing" if flags.sharing else "pruning" if flags.pruning else flags.variants
    if chosen:  # each variant of a comparison set against its first (distilled ones)
        rows, source = _side_by_side(cfg, rest, flags, benchmark_variants(chosen))
        _report_rows(rows, format_term_costs(rows), source, flags)
        return
    if flags.options:  # each speed option on vs off (on CUDA when present)
        rows, source = _side_by_side(cfg, rest, flags, OPTION_VARIANTS)
        _report_rows(rows, format_term_costs(rows), source, flags)
        return
    if flags.weightings is not None:
        _weightings(cfg, flags)
        return
    with tempfile.TemporaryDirectory(prefix="unirep-bench-") as tmp:
        flags.run_dir = flags.run_dir or Path(tmp)  # teachers trained once, for both sections
        results = _default_benchmark(cfg, flags)
        if torch.cuda.is_available():
            results["gpu"] = _gpu_section(cfg, rest, flags)
    if flags.json:
        flags.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {flags.json}")


def cli(prog: str = PROG) -> None:
    """The console entry point (``unirep benchmark``; the script passes its own name)."""
    run(partial(main, prog), prog)
