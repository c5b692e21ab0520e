"""The allocator set-up every script does at start-up (unirep.training.system)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from unirep.training import system

CHILD = """
import os, sys
from unirep.training import system
changed = system.tune_allocator()
# a spawned interpreter inherits the thresholds through the environment glibc reads at start
out = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
print(changed, out["MALLOC_MMAP_THRESHOLD_"], out["MALLOC_TRIM_THRESHOLD_"])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_scripts_fix_the_mmap_threshold_and_raise_the_trim_threshold() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop(system.OPT_OUT, None)
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                            env=env, check=True)  # fmt: skip
    changed, mmap, trim = result.stdout.split()
    assert changed == "True"
    assert int(mmap) == 32 * 1024 * 1024 and int(trim) == 1024**3
    opted_out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                               env={**env, system.OPT_OUT: "default"}, check=True)  # fmt: skip
    assert opted_out.stdout.split() == ["False", "None", "None"]


def test_every_script_sets_it_up_first(monkeypatch: pytest.MonkeyPatch) -> None:
    from unirep.cli import args as cli

    order: list[str] = []
    monkeypatch.setattr(cli, "tune_allocator", lambda: order.append("allocator"))
    cli.run(lambda: order.append("main"), "prog")
    assert order == ["allocator", "main"]
    assert system.minor_page_faults() > 0
