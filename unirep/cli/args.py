"""The one command-line shape every script shares: ``[--config PRESET_OR_PATH] [key=value ...]``,
and its Python counterpart, :func:`resolve_config` (a Config, a preset or a YAML path, plus
overrides)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from unirep.config.schema import (
    Config,
    ConfigError,
    preset_names,
)
from unirep.errors import UnirepError
from unirep.pipeline.validate import load_config
from unirep.training.system import tune_allocator

USAGE = (
    "usage: {prog} [--config PRESET_OR_PATH] [key=value ...]\n"
    "  presets: {presets}\n"
    "  example: {prog} --config mini-decathlon train.max_steps=100 seed=1"
)


def parse_args(argv: list[str] | None = None, prog: str = "script") -> Config:
    """Parse ``--config`` and dotted overrides; exit with a one-line error on a bad config."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE.format(prog=prog, presets=", ".join(preset_names())))
        raise SystemExit(0)
    preset = None
    overrides = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise SystemExit(f"{prog}: --config needs a preset name or a YAML path")
            preset = args[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            preset = arg.split("=", 1)[1]
        elif arg.startswith("-") or "=" not in arg:
            raise SystemExit(
                f"{prog}: unexpected argument {arg!r}\n"
                + USAGE.format(prog=prog, presets=", ".join(preset_names()))
            )
        else:
            overrides.append(arg)
        i += 1
    try:
        return load_config(preset, overrides)
    except (ConfigError, KeyError, TypeError) as err:
        raise SystemExit(f"{prog}: configuration error: {err}") from None


def run(main: Callable[[], None], prog: str) -> None:
    """Run a script's ``main``; every user-facing error (:class:`unirep.errors.UnirepError`: bad
    config, data, teachers, a non-finite value) exits with its one-line message, no traceback.
    The allocator is set up first (:func:`unirep.training.system.tune_allocator`)."""
    tune_allocator()
    try:
        main()
    except UnirepError as err:
        raise SystemExit(f"{prog}: error: {err}") from None
