"""The one command-line shape every script shares: ``[--config PRESET_OR_PATH] [key=value ...]``,
and its Python counterpart, :func:`resolve_config` (a Config, a preset or a YAML path, plus
overrides)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from unirep.config import (
    Config,
    ConfigError,
    apply_override,
    from_dict,
    preset_names,
    read_config,
    to_dict,
)
from unirep.errors import UnirepError
from unirep.system import tune_allocator
from unirep.validate import load_config, validate

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


def resolve_config(
    config: Config | str | Path | None = None, overrides: Sequence[str] = ()
) -> Config:
    """A checked config from Python: ``config`` is a :class:`Config`, a preset name or a YAML
    path (None: the default preset), with dotted ``key=value`` ``overrides`` applied, as
    ``--config`` and the overrides do on the command line. A :class:`Config` is copied, not
    changed. Bad keys, types and values raise :class:`ConfigError` naming the key."""
    if isinstance(config, Config):
        values = to_dict(config)
        for override in overrides:
            apply_override(values, override)
        cfg = from_dict(Config, values)
    else:
        cfg = read_config(None if config is None else str(config), list(overrides))
    validate(cfg)
    return cfg


def run(main: Callable[[], None], prog: str) -> None:
    """Run a script's ``main``; every user-facing error (:class:`unirep.errors.UnirepError`: bad
    config, data, teachers, a non-finite value) exits with its one-line message, no traceback.
    The allocator is set up first (:func:`unirep.system.tune_allocator`)."""
    tune_allocator()
    try:
        main()
    except UnirepError as err:
        raise SystemExit(f"{prog}: error: {err}") from None
