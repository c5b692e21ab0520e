"""Two CPU processes under ``accelerate launch --multi_gpu``: they must really share the work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_two_processes_share_training(tiny_cache: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        str(ROOT / "scripts" / "distill.py"),
        *TINY, f"data.cache_dir={tiny_cache}", f"output_dir={tmp_path}", "name=ddp",
        "teachers.retrain=true", f"teachers.root={tmp_path / 'teachers'}",
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["summary"]["num_processes"] == 2
    for task in metrics["tasks"].values():
        assert 0.0 <= task["student"]["accuracy"] <= 1.0
    # every process saved its own RNG state in the checkpoints: two ranks took part
    step = sorted((tmp_path / "ddp" / "checkpoints" / "student").glob("step_*"))[-1]
    assert {p.name for p in step.glob("rng_*.pt")} == {"rng_0.pt", "rng_1.pt"}
    assert result.stdout.count("student mean accuracy") == 1  # only the main process reports


def _launch(script: str, port: int, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        str(ROOT / "scripts" / script), *args,
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_dense_run_and_gathered_evaluation(tiny_cache: Path, tmp_path: Path) -> None:
    from tests.conftest import TINY_DENSE

    common = [*TINY_DENSE, f"data.cache_dir={tiny_cache}", f"output_dir={tmp_path}",
              f"teachers.root={tmp_path / 'teachers'}", "data.eval_batch_size=2"]  # fmt: skip
    result = _launch(
        "distill.py", 29518, "--config", "mini-scenes", *common, "name=ddp", "data.batch_size=2"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["summary"]["num_processes"] == 2
    step = sorted((tmp_path / "ddp" / "checkpoints" / "student").glob("step_*"))[-1]
    assert {p.name for p in step.glob("rng_*.pt")} == {"rng_0.pt", "rng_1.pt"}
    assert result.stdout.count("student Δm vs teachers") == 1

    # the 6 test scenes in batches of 2 per process: 3 batches for 2 processes, so the sampler
    # pads the shards with repeats,
    # which the gathered metrics must drop (a one-process evaluation gives the same numbers)
    student = tmp_path / "ddp" / "student"
    two = _launch("evaluate.py", 29519, "--config", "mini-scenes", *common, "name=ev2",
                  f"student={student}")  # fmt: skip
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--config", "mini-scenes",
         *common, "name=ev1", f"student={student}"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    m2 = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    m1 = json.loads((tmp_path / "ev1" / "metrics.json").read_text())
    assert m2["summary"]["num_processes"] == 2 and m1["summary"]["num_processes"] == 1
    for task, entry in m1["tasks"].items():
        for role in ("student", "teacher"):
            assert m2["tasks"][task][role] == pytest.approx(entry[role], rel=1e-5), (task, role)
        assert m2["tasks"][task]["student"] == pytest.approx(
            metrics["tasks"][task]["student"], rel=1e-5
        )
