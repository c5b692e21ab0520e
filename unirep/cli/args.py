"""The one command-line shape every subcommand shares:
``[--config PRESET_OR_PATH] [--option VALUE ...] [key=value ...]``, read into a validated config
(:func:`parse_command`), and the wrapper that turns a user error into one line (:func:`run`)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from unirep.cli.helptext import usage
from unirep.config.schema import Config
from unirep.errors import ConfigError, UnirepError
from unirep.pipeline.validate import load_config
from unirep.training.system import tune_allocator


def split_args(
    argv: Sequence[str], prog: str, options: Sequence[str] = ()
) -> tuple[str | None, dict[str, str], list[str]]:
    """``(preset, {option: value}, overrides)`` of a command line; ``--config`` and each option
    at most once. ``-h``/``--help`` prints the usage and exits 0; anything else exits with one
    line."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage(prog, options))
        raise SystemExit(0)
    values: dict[str, str] = {}
    overrides: list[str] = []
    args, i = list(argv), 0
    while i < len(args):
        arg = args[i]
        flag = arg.split("=", 1)[0]
        if flag in ("--config", *options):
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(args):
                value, i = args[i + 1], i + 1
            else:
                raise SystemExit(f"{prog}: {flag} needs a value")
            if flag in values:
                raise SystemExit(
                    f"{prog}: {flag} is given twice ({values[flag]!r} and {value!r}); give it once"
                )
            values[flag] = value
        elif arg.startswith("-") or "=" not in arg:
            raise SystemExit(f"{prog}: unexpected argument {arg!r} (see {prog} --help)")
        else:
            overrides.append(arg)
        i += 1
    preset = values.pop("--config", None)
    return preset, values, overrides


def parse_command(
    argv: Sequence[str] | None = None, prog: str = "unirep", options: Sequence[str] = ()
) -> tuple[Config, dict[str, str]]:
    """The validated config of a command line and the values of its ``options``; a bad config
    exits with one line naming the key."""
    preset, values, overrides = split_args(sys.argv[1:] if argv is None else argv, prog, options)
    try:
        return load_config(preset, overrides), values
    except (ConfigError, KeyError, TypeError) as err:
        raise SystemExit(f"{prog}: configuration error: {err}") from None


def parse_args(argv: Sequence[str] | None = None, prog: str = "unirep") -> Config:
    """The validated config of ``[--config PRESET_OR_PATH] [key=value ...]``."""
    return parse_command(argv, prog)[0]


def run(main: Callable[[], None], prog: str) -> None:
    """Run a command's ``main``; every user-facing error (:class:`unirep.errors.UnirepError`:
    bad config, data, teachers, a non-finite value) exits with its one-line message, no
    traceback. So does a write the file system refuses after the start-up checks (a full disk,
    a read-only folder, a path component that is a file), naming the file. The allocator is set
    up first (:func:`unirep.training.system.tune_allocator`)."""
    tune_allocator()
    try:
        main()
    except UnirepError as err:
        raise SystemExit(f"{prog}: error: {err}") from None
    except OSError as err:
        import errno

        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        refused = err.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                                errno.EEXIST, errno.EISDIR)  # fmt: skip
        if not (full or (refused and err.filename)):
            raise
        where = f" {str(err.filename)!r}" if err.filename else ""
        todo = "free some space" if full else "check that folder's permissions and path"
        raise SystemExit(
            f"{prog}: error: cannot write{where}: {err.strerror}; {todo} (or set output_dir=, "
            "data.cache_dir= or teachers.root= elsewhere)"
        ) from None
