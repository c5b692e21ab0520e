"""A user error under ``accelerate launch`` (the form of every documented command), with one
and with two processes, is one line and a non-zero status, with no launcher traceback; Ctrl-C
is one line too."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# every launcher setting given, so that accelerate has no defaults warning to print
LAUNCH = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train.max_steps=0"], "config key 'train.max_steps'"),
        (["--config", "no-such-preset"], "no-such-preset"),
        (["--verbose"], "unexpected argument"),
    ],
)
def test_a_launched_error_is_one_line(
    tmp_path: Path, processes: int, args: list[str], needle: str
) -> None:
    several = ["--multi_gpu", "--main_process_port", str(_free_port())] if processes > 1 else []
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *several, "--num_processes",
        str(processes), *LAUNCH, str(ROOT / "scripts" / "distill.py"), *args,
        f"output_dir={tmp_path / 'runs'}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


def _long_run(tiny_cache: Path, tmp_path: Path, name: str) -> list[str]:
    """A distill command that runs far longer than any test waits (progress off)."""
    return [
        sys.executable, str(ROOT / "scripts" / "distill.py"), *TINY, "train.max_steps=100000",
        f"data.cache_dir={tiny_cache}", f"output_dir={tmp_path / 'runs'}", f"name={name}",
        "progress=false",
    ]  # fmt: skip


def _interruptible() -> None:
    """In the child before it runs: SIGINT back to its default. A shell runs a background job
    (``pytest ... &``, ``nohup``) with SIGINT ignored, a disposition every child inherits, and a
    Python started so never sees a Ctrl-C (the two tests below then waited 300 s for nothing)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(command: list[str]) -> subprocess.Popen[str]:
    """Start ``command`` on one thread and return once it has named its run folder (the run has
    started); killed if no such line comes within 5 minutes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=_interruptible,
    )  # fmt: skip
    assert process.stdout is not None
    watchdog = threading.Timer(300, process.kill)  # never left running if no line comes
    watchdog.start()
    try:
        for line in process.stdout:
            if line.startswith("run directory:"):
                break
    finally:
        watchdog.cancel()
    return process


@pytest.mark.slow
def test_ctrl_c_is_one_line(tiny_cache: Path, tmp_path: Path) -> None:
    process = _start(_long_run(tiny_cache, tmp_path, "stopped"))
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted; continue with resume=true" in lines[0], stderr


@pytest.mark.slow
def test_a_run_folder_in_use_is_refused(tiny_cache: Path, tmp_path: Path) -> None:
    """A second run with the same name, or resume=true while the run goes on, is refused in one
    line (the folder's lock), and the first run is left alone."""
    base = _long_run(tiny_cache, tmp_path, "busy")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = _start(base)
    try:
        for extra in ([], ["resume=true"], ["overwrite=true"]):
            second = subprocess.run(
                [*base, *extra], capture_output=True, text=True, timeout=300, env=env
            )
            assert second.returncode != 0
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "is in use by another unirep process" in lines[0], lines
        assert first.poll() is None  # still running
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.communicate(timeout=300)
        finally:
            first.kill()
