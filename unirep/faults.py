"""Named kill points, for the tests that kill a run and resume it.

``UNIREP_KILL_AT=<point>`` in the environment makes the process SIGKILL itself the first time it
reaches ``<point>``; without it (every normal run) :func:`failpoint` is one dictionary lookup.
Points are named by what was just done, e.g. ``step:teacher-digits:3`` (after step 3 of that
phase), ``write:checkpoints/.../step_000002`` (a checkpoint's files written, not yet renamed),
``write:student/best.safetensors`` (the temporary file written, not yet moved into place),
``log:baseline:4`` (half a log row appended), ``generate:<tree>`` (a data tree half generated).
A point's name is printed to stderr when ``UNIREP_KILL_AT=list`` so tests can pick real ones.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "UNIREP_KILL_AT"


def failpoint(name: str) -> None:
    """SIGKILL this process if ``$UNIREP_KILL_AT`` names ``name`` (``list``: print the name)."""
    target = os.environ.get(ENV)
    if not target:
        return
    if target == "list":
        print(f"failpoint {name}", file=sys.stderr, flush=True)
    elif target == name:
        os.kill(os.getpid(), signal.SIGKILL)
