"""Values computed once and kept in the run folder, read by every process: a process that looks
after the main one has written must still meet it at the barrier (else the main one waits there
forever, as a 2-process AutoMTL run once did after its search)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from unirep.pipeline.rundir import stored


class ThreadRank:
    """One "process" of a 2-process group, as a thread: a shared barrier for
    ``wait_for_everyone`` (broken after ``timeout`` seconds, as a hang)."""

    def __init__(self, rank: int, barrier: threading.Barrier) -> None:
        self.is_main_process = rank == 0
        self.barrier = barrier

    def wait_for_everyone(self) -> None:
        self.barrier.wait()


@pytest.mark.parametrize("main_only", [False, True])
def test_a_late_process_still_meets_the_main_one(tmp_path: Path, main_only: bool) -> None:
    path = tmp_path / "value.json"
    barrier = threading.Barrier(2, timeout=5)
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            if r == 1:
                time.sleep(0.3)  # looks for the file after the main process could have written it
            results[r] = stored(path, ThreadRank(r, barrier), lambda: {"value": 1}, main_only)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors, errors
    assert results == {0: {"value": 1}, 1: {"value": 1}}
    # read back by a later run (resume): no computation
    assert stored(path, ThreadRank(0, threading.Barrier(1)), lambda: 1 / 0, main_only) == {
        "value": 1
    }
