"""The one command-line shape every subcommand shares:
``[--config PRESET_OR_PATH] [--option VALUE ...] [key=value ...]``, read into a validated config
(:func:`parse_command`), and the wrapper that turns a user error into one line (:func:`run`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

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
    a read-only folder, a path component that is a file), naming the file, and Ctrl-C. Under
    ``accelerate launch`` the launcher is stopped too, so that it adds no traceback of its own
    (:func:`exit_with`). The allocator is set up first
    (:func:`unirep.training.system.tune_allocator`)."""
    tune_allocator()
    try:
        main()
    except UnirepError as err:
        exit_with(f"{prog}: error: {err}")
    except SystemExit as done:  # a usage error carries its one-line message
        if not isinstance(done.code, str):
            raise
        exit_with(done.code)
    except KeyboardInterrupt:
        exit_with(f"{prog}: interrupted; continue with resume=true and the run's name=", 130)
    except OSError as err:
        exit_with(f"{prog}: error: {_write_error(err)}")


def _write_error(err: OSError) -> str:
    """The one-line message of a write the file system refused; re-raises any other error."""
    import errno

    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    refused = err.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                            errno.EEXIST, errno.EISDIR)  # fmt: skip
    if not (full or (refused and err.filename)):
        raise err
    where = f" {str(err.filename)!r}" if err.filename else ""
    todo = "free some space" if full else "check that folder's permissions and path"
    return (
        f"cannot write{where}: {err.strerror}; {todo} (or set output_dir=, data.cache_dir= or "
        "teachers.root= elsewhere)"
    )


def _launcher() -> Any:
    """The ``accelerate launch`` process this one runs under (its parent), or None."""
    try:
        import psutil

        parent = psutil.Process(os.getppid())
        words = parent.cmdline()
    except Exception:  # no psutil, or the parent is gone: not under a launcher we know
        return None
    names = [Path(w).name for w in words[:4]]
    by_command = (
        "accelerate" in names
        and names.index("accelerate") + 1 < len(names)
        and (names[names.index("accelerate") + 1] == "launch")
    )
    by_module = any(w in ("accelerate.commands.launch", "accelerate.commands.accelerate_cli")
                    for w in words[:4])  # fmt: skip
    return parent if by_command or by_module else None


def exit_with(message: str, code: int = 1) -> NoReturn:
    """Exit with ``message`` as the only line on stderr.

    Run directly, this is ``SystemExit``. Under ``accelerate launch`` a failed child makes the
    launcher print the child's output again and a traceback of its own, so the first process to
    fail (rank 0 first; another rank waits 2 s for it) prints the line, stops the other ranks
    and then the launcher itself: SIGTERM, which accelerate's single-process launcher turns
    into a quiet exit (status 143), or SIGKILL for several processes, whose torch launcher
    logs three lines on SIGTERM (status 137; an interactive shell then says "Killed"). Either
    way the status is non-zero and the command's own output is the one line.
    """
    launcher = _launcher()
    if launcher is None:
        if code == 1:
            raise SystemExit(message)
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(code)
    import signal
    import time

    if int(os.environ.get("RANK", "0")) != 0:
        time.sleep(2)  # rank 0 says it, and stops this process, if it fails too
    print(message, file=sys.stderr, flush=True)
    time.sleep(1)  # the launcher copies this line to its own stderr before it is stopped
    for sibling in launcher.children():
        if sibling.pid != os.getpid():
            sibling.terminate()
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    os.kill(launcher.pid, signal.SIGKILL if several else signal.SIGTERM)
    time.sleep(10)  # the launcher stops this process in turn
    os._exit(code)
