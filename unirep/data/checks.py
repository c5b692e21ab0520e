"""Shared pieces of the up-front data checks: file fingerprints and cached scan results.

Readers check their own files (``DecathlonDomain.check``, ``HFDomain.check``,
``MTANDense.check``); :meth:`unirep.data.streams.RunData.prepare` runs those checks over every
split of a run before any teacher trains. Two things are shared here:

- :func:`files_fingerprint`: what identifies a set of files' content cheaply (name, size and
  modification time of each, plus any bytes the caller hashes first, e.g. an annotation file),
  used to key every cache derived from the files (statistics, scans);
- :func:`cached_scan`: the result of an expensive full pass (decoding every image under
  ``data.on_corrupt=skip``, reading every dense array), stored under ``<cache>/checks/`` keyed by
  such a fingerprint, so the main process does the pass once and the other processes, and later
  runs over unchanged files, read its result.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from unirep.io import atomic_write_json

__all__ = ["SkippedFile", "cached_scan", "files_fingerprint"]

#: One file left out under ``data.on_corrupt=skip``: ``{"path": ..., "reason": ...}``.
SkippedFile = dict[str, str]
#: Bump when a scan's meaning changes, so that older cached results are not reused.
SCAN_VERSION = 1


def files_fingerprint(paths: Iterable[Path], root: Path, head: bytes = b"") -> str:
    """sha256 of ``head`` then each file's path relative to ``root``, size and mtime (ns).

    The root itself does not enter: a copy of the tree with its times preserved has the same
    fingerprint; a rewritten file changes it. Raises ``FileNotFoundError`` for a missing file.
    """
    digest = hashlib.sha256(head)
    for path in paths:
        st = os.stat(path)
        name = os.path.relpath(path, root)
        digest.update(f"\0{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def cached_scan(
    cache_dir: Path | None, kind: str, key: str, scan: Callable[[], list[SkippedFile]]
) -> list[SkippedFile]:
    """``scan()``, or its stored result for ``key`` under ``cache_dir/checks/<kind>-<key>.json``.

    ``scan`` returns the bad files as ``{"path", "reason"}`` with paths relative to the data root
    (so the result holds for any copy of the files). Without ``cache_dir`` it simply runs.
    """
    if cache_dir is None:
        return scan()
    path = Path(cache_dir) / "checks" / f"{kind}-{key[:32]}.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry.get("key") == key and entry.get("version") == SCAN_VERSION:
            return [dict(e) for e in entry["bad"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    bad = scan()
    atomic_write_json(path, {"version": SCAN_VERSION, "key": key, "bad": bad})
    return bad
