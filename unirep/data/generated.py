"""Generated data trees (the embedded benchmarks), written atomically and tagged with a marker.

A generator writes into a temporary folder beside the target and renames it into place, so an
interrupted generation never leaves a half tree; ``.complete`` records the generation parameters,
so a tree is regenerated only when they change, and a folder without it is never replaced.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unirep.faults import failpoint

COMPLETE_MARKER = ".complete"


def read_marker(root: Path) -> dict[str, Any] | None:
    """The generation parameters recorded in ``root``, or None when absent or unreadable."""
    try:
        return json.loads((Path(root) / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_tree(
    root: Path, marker: dict[str, Any], write: Callable[[Path], None], what: str
) -> None:
    """Run ``write(tmp)`` into a temporary folder, tag it with ``marker``, move it to ``root``.

    An existing non-empty ``root`` without a marker is refused (it is not ours to replace).
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()) and read_marker(root) is None:
        raise FileExistsError(
            f"{root} exists and is not a {what} (no {COMPLETE_MARKER} marker); "
            "refusing to replace it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        write(tmp)
        failpoint(f"generate:{root.name}")
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker), encoding="utf-8")
        _move_into_place(tmp, root, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(root: Path) -> None:
    """Delete the temporary trees of generations whose process is gone (killed mid-way)."""
    for tmp in root.parent.glob(f".{root.name}.tmp-*"):
        pid = tmp.name.removeprefix(f".{root.name}.tmp-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _move_into_place(tmp: Path, root: Path, marker: dict[str, Any]) -> None:
    try:
        os.rename(tmp, root)  # atomic; succeeds when root is absent or an empty folder
        return
    except OSError:
        pass
    if read_marker(root) == marker:
        return  # another process finished the same tree meanwhile
    old = root.parent / f".{root.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(root, old)
    try:
        os.rename(tmp, root)
    finally:
        shutil.rmtree(old, ignore_errors=True)
