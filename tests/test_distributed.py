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
