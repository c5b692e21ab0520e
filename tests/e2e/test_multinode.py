"""The documented multi-node launch, exercised on one machine: two ``accelerate launch``
launchers, each a "machine" of one process (``--num_machines 2 --machine_rank 0|1
--main_process_ip 127.0.0.1``), must give what one machine with two processes gives: the same
teachers, the same teacher-output cache, the same student and the same metrics."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.e2e.test_distributed import launch_command, launch_env, without_timings

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _args(tiny_cache: Path, root: Path, name: str) -> list[str]:
    return [
        *TINY, f"data.cache_dir={tiny_cache}", f"output_dir={root}", f"name={name}",
        f"teachers.root={root / 'teachers'}", "teachers.output_cache.draws=2",
        "teachers.output_cache.dtype=float32", "progress=false",
    ]  # fmt: skip


def _digests(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` but timings and logs."""
    skip = ("teacher.json", ".csv", ".log", "events.out")
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(skip)
    }


def test_two_machines_of_one_process_match_one_machine_of_two(
    tiny_cache: Path, tmp_path: Path
) -> None:
    # both layouts run in the same folder (the model card and config name their paths), each
    # moved aside when it ends
    root, one, two = tmp_path / "root", tmp_path / "one", tmp_path / "two"
    single = subprocess.run(
        launch_command(29591, _args(tiny_cache, root, "run")),
        capture_output=True, text=True, env=launch_env(), timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    root.rename(one)

    launchers = [
        subprocess.Popen(
            launch_command(29593, _args(tiny_cache, root, "run"), machines=2, rank=rank),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=launch_env(),
        )
        for rank in (0, 1)
    ]
    outputs = []
    for launcher in launchers:
        try:
            outputs.append(launcher.communicate(timeout=600)[0])
        finally:
            launcher.kill()
    for launcher, output in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, output[-4000:]
    root.rename(two)

    metrics = {root: json.loads((root / "run" / "metrics.json").read_text()) for root in (one, two)}
    assert metrics[two]["summary"]["num_processes"] == 2
    assert without_timings(metrics[one]) == without_timings(metrics[two])
    results = [(root / "run" / "results.json").read_bytes() for root in (one, two)]
    assert results[0] == results[1]
    assert _digests(one / "run" / "student") == _digests(two / "run" / "student")
    # the teachers and the teacher-output cache: the same files, byte for byte
    teachers = {root: _digests(root / "teachers") for root in (one, two)}
    assert any(k.startswith("outputs/") for k in teachers[one]), sorted(teachers[one])
    assert teachers[one] == teachers[two]
    # each machine's local main process reports once (accelerate's print), the same line
    lines = [[ln for ln in out.splitlines() if "student mean accuracy" in ln] for out in outputs]
    assert [len(found) for found in lines] == [1, 1], outputs[1][-3000:]
    assert lines[0] == lines[1]
