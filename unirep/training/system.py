"""Process set-up that the training loop's speed depends on: glibc's allocator thresholds.

glibc's ``malloc`` adapts its mmap threshold as blocks are freed and returns heap memory to the
system (``trim``) whenever the top of the heap frees more than the trim threshold. A training
step allocates and frees the same activation-sized buffers every time, so with the defaults each
step maps and unmaps them again: about 19 000 page faults per step and a sixth of the run in
system time on a 2-core CPU machine. :func:`tune_allocator` fixes the mmap threshold at
glibc's maximum (32 MiB on 64-bit: every buffer below it comes from the heap and is reused) and
raises the trim threshold (1 GiB: freed memory stays in the process for the next step).

Every script calls it at start-up (:func:`unirep.cli.args.run`); it also sets the
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables, which glibc reads
when a process starts, so data-loader workers and ``compare.py --jobs`` workers (spawned
interpreters) get the same settings. ``UNIREP_MALLOC=default`` keeps glibc's defaults. Nothing
changes in the numbers a run computes, only where its memory comes from.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the largest accepted
TRIM_THRESHOLD = 1024 * 1024 * 1024
OPT_OUT = "UNIREP_MALLOC"


def tune_allocator() -> bool:
    """Set the thresholds for this process and the processes it starts. Returns whether this
    process's allocator was changed (False off glibc, or with ``UNIREP_MALLOC=default``)."""
    if os.environ.get(OPT_OUT, "") == "default" or not sys.platform.startswith("linux"):
        return False
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(TRIM_THRESHOLD))
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (musl and others have no such symbol)
    except (OSError, AttributeError):
        return False
    mmap = int(os.environ["MALLOC_MMAP_THRESHOLD_"])
    trim = int(os.environ["MALLOC_TRIM_THRESHOLD_"])
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))


def minor_page_faults() -> int:
    """This process's minor page faults so far (``getrusage``; 0 where unavailable)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
