"""The ``unirep`` command: one entry point with subcommands, as torchtune ships ``tune``.

    unirep --help
    unirep distill [--config PRESET_OR_PATH] [key=value ...]
    accelerate launch -m unirep distill ...          (several processes; or scripts/distill.py)

Each subcommand is a module of this package with ``main`` (the work) and ``cli`` (``main`` with
user errors printed as one line); this module only dispatches, importing the subcommand's module
when it is called, so ``unirep --help`` answers without loading the training stack.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "distill": ("distill", "stage one (missing teachers) and two: baseline, student, report"),
    "train-teachers": ("train_teachers", "stage one alone: train or verify every teacher"),
    "evaluate": ("evaluate", "evaluate an exported student on a split (metrics.json)"),
    "benchmark": ("benchmark", "time the training step against a minimal loop, per phase"),
    "compare": ("compare", "variants x seeds on one preset: one table, one plot"),
    "aggregate": ("aggregate", "mean ± std of finished runs' metrics.json"),
}
"""Subcommand name -> (module in :mod:`unirep.cli`, one line of help)."""

OPTIONS: dict[str, tuple[str, ...]] = {
    "evaluate": ("--student",),
    "compare": ("--seeds", "--variants", "--name", "--reference", "--jobs"),
}
"""The ``--option VALUE`` flags of a subcommand beyond ``--config`` (shown by its ``--help``)."""

OWN_HELP = ("benchmark", "aggregate")
"""Subcommands whose ``--help`` is their own (their module docstring or usage line)."""


def usage() -> str:
    """The top-level help: every subcommand with its line."""
    width = max(len(n) for n in COMMANDS)
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return (
        "usage: unirep <command> [--config PRESET_OR_PATH] [key=value ...]\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n"
        "'unirep <command> --help' lists its presets and options; several processes:\n"
        "'accelerate launch -m unirep <command> ...' (or accelerate launch scripts/<command>.py)"
    )


def main(
    argv: Sequence[str] | None = None, prog: str | None = None, command: str | None = None
) -> None:
    """Run ``unirep <command> [args]`` (``argv`` without the program name; None: ``sys.argv``).

    ``command`` puts a subcommand in front of ``argv`` and ``prog`` names the program in
    messages: ``scripts/distill.py`` is ``main(command="distill", prog="distill.py")``."""
    if hasattr(sys.stdout, "reconfigure"):  # progress lines reach a pipe or a log file at once
        sys.stdout.reconfigure(line_buffering=True)
    args = list(sys.argv[1:] if argv is None else argv)
    if command is not None:
        args = [command, *args]
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if args else 2)
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        raise SystemExit(f"unirep: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}")
    prog = prog or f"unirep {name}"
    if name not in OWN_HELP and any(a in ("-h", "--help") for a in rest):
        from unirep.cli.helptext import usage as command_usage  # light: no torch

        print(command_usage(prog, OPTIONS.get(name, ())))
        raise SystemExit(0)
    if name != "aggregate" and os.environ.get("RANK", "0") == "0":  # before torch loads (seconds)
        print(f"{prog}: starting (loading torch)", flush=True)
    module = importlib.import_module(f"unirep.cli.{COMMANDS[name][0]}")
    sys.argv = [prog, *rest]
    module.cli(prog)
