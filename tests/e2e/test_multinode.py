"""The documented multi-node launch, exercised on one machine: two ``accelerate launch``
launchers, each a "machine" of one process (``--num_machines 2 --machine_rank 0|1
--main_process_ip 127.0.0.1``), must give what one machine with two processes gives: the same
teachers, the same teacher-output cache, the same student and the same metrics."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _command(port: int, machines: int, rank: int, args: list[str]) -> list[str]:
    """``accelerate launch`` of ``scripts/distill.py`` with 2 processes over ``machines``."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", str(machines),
        "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "scripts" / "distill.py"), *args,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("UNIREP_KILL_AT", None)
    return env


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


def _strip(value: object) -> object:
    """metrics.json without timings (wall-clock differs between runs)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if "seconds" not in k}
    return value


def test_two_machines_of_one_process_match_one_machine_of_two(
    tiny_cache: Path, tmp_path: Path
) -> None:
    # both layouts run in the same folder (the model card and config name their paths), each
    # moved aside when it ends
    root, one, two = tmp_path / "root", tmp_path / "one", tmp_path / "two"
    single = subprocess.run(
        _command(29591, 1, 0, _args(tiny_cache, root, "run")),
        capture_output=True, text=True, env=_env(), timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    root.rename(one)

    launchers = [
        subprocess.Popen(
            _command(29593, 2, rank, _args(tiny_cache, root, "run")),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
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
    assert _strip(metrics[one]) == _strip(metrics[two])
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
