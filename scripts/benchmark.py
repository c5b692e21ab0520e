"""Time the real training step against a minimal loop; split a phase into its parts.

    python scripts/benchmark.py [--steps N] [--warmup N] [--json PATH] [--run-dir DIR]
        [--untrained-teachers] [--config PRESET_OR_PATH] [key=value ...]

For the baseline and the distilled student of the config (any preset, any ``weighting=``), times
``unirep.trainer.train_step`` (what ``fit`` runs) split into data / teachers / step, one
validation pass and one checkpoint write, beside a hand-written torch loop on the same network
and batches; prints markdown tables and the projected split of a whole phase
(see :mod:`unirep.benchmark`). Run it with ``python`` (one process); each measurement runs in a
fresh process of its own.

Flags (read before the config arguments): ``--steps`` timed steps (default 20), ``--warmup``
untimed steps first (default 3), ``--json`` writes every figure there, ``--run-dir`` keeps the
benchmark's teachers there (default: a temporary folder), ``--untrained-teachers`` times with
untrained teachers (same cost, no training; say so where you quote the numbers),
``--joint-scaling`` only times the partial-label joint terms (MTPSL, JTR) against the number of
tasks (random inputs, 8 images of 48×64; no config needed), ``--term-costs`` only times the
student's real step with distillation alone, then + each cross-task / contrastive term of the
ablation (``scripts/compare.py --variants xtask``) and + all of them. Otherwise the
config's teachers are used when they verify, else trained into the run dir with the config's
teacher recipe, which overrides can shorten, e.g. ``teachers.train.max_steps=50``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from teachers.recipe import ensure_teachers
from unirep.benchmark import (
    format_joint_scaling,
    format_report,
    format_term_costs,
    joint_term_scaling,
    run_benchmark,
    teacher_config,
    term_costs,
)
from unirep.cli import parse_args, run
from unirep.compare import XTASK_VARIANTS
from unirep.config import Config
from unirep.data.streams import RunData
from unirep.recipe import resolve_data
from unirep.rundir import make_accelerator


def split_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the benchmark's flags, the arguments left for ``unirep.cli.parse_args``)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--untrained-teachers", action="store_true")
    parser.add_argument("--joint-scaling", action="store_true")
    parser.add_argument("--term-costs", action="store_true")
    return parser.parse_known_args(argv)


def _with_teachers(
    cfg: Config, flags: argparse.Namespace, tmp: Path
) -> tuple[Config, str, tuple[Any, RunData]]:
    """(config whose teacher root holds the benchmark's teachers, where they come from, its
    accelerator and data): the config's own teachers when they verify, else teachers trained
    into ``--run-dir`` (default ``tmp``); none with ``--untrained-teachers``."""
    run_dir = flags.run_dir or tmp
    accelerator = make_accelerator(cfg)
    data = resolve_data(cfg, accelerator)
    source = "untrained (random weights)"
    if not flags.untrained_teachers:
        cfg, source = teacher_config(cfg, data, run_dir)
        ensure_teachers(cfg, accelerator, data, run_dir)
    return cfg, source, (accelerator, data)


def _term_costs(cfg: Config, rest: list[str], flags: argparse.Namespace) -> None:
    """The student's step with distillation alone, then with each cross-task / contrastive
    term of the ablation (:data:`unirep.compare.XTASK_VARIANTS`), side by side."""
    configs = {
        name: parse_args([*rest, *overrides], prog="benchmark.py")
        for name, overrides in XTASK_VARIANTS.items()
        if not name.startswith("combine:")
    }
    every = [o for n, over in XTASK_VARIANTS.items() for o in over if n != "distill"]
    configs["+all terms"] = parse_args([*rest, *dict.fromkeys(every)], prog="benchmark.py")
    with tempfile.TemporaryDirectory(prefix="unirep-bench-") as tmp:
        cfg, source, _ = _with_teachers(cfg, flags, Path(tmp))
        for c in configs.values():
            c.teachers.root = cfg.teachers.root
        rows = term_costs(configs, flags.steps, flags.warmup, flags.untrained_teachers)
    print(f"teachers: {source}; device {rows['distill']['device']}, "
          f"{rows['distill']['threads']} thread(s), {flags.steps} steps")  # fmt: skip
    print(format_term_costs(rows))
    if flags.json:
        flags.json.write_text(json.dumps(rows, indent=2))


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return
    flags, rest = split_flags(sys.argv[1:])
    if flags.joint_scaling:  # the partial-label joint terms' cost against the number of tasks
        print(format_joint_scaling(joint_term_scaling()))
        return
    cfg = parse_args(rest, prog="benchmark.py")
    if flags.term_costs:
        _term_costs(cfg, rest, flags)
        return
    with tempfile.TemporaryDirectory(prefix="unirep-bench-") as tmp:
        cfg, source, (accelerator, data) = _with_teachers(cfg, flags, Path(tmp))
        print(f"teachers: {source}")
        results = run_benchmark(
            cfg, flags.steps, flags.warmup, flags.untrained_teachers, data=data,
            accelerator=accelerator,
        )  # fmt: skip
    results["info"]["teachers"] = source
    print(format_report(results))
    if flags.json:
        flags.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {flags.json}")


if __name__ == "__main__":
    run(main, "benchmark.py")
