"""Two CPU processes under ``accelerate launch --multi_gpu``: they must really share the work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, TINY_DENSE

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def launch_command(port: int, args: list[str], machines: int = 1, rank: int = 0) -> list[str]:
    """``accelerate launch --multi_gpu`` of ``scripts/distill.py args`` with 2 CPU processes in
    all, over ``machines`` launchers (this one ``rank``; the others on 127.0.0.1)."""
    several = ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"] * (machines > 1)
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", str(machines), *several,
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        str(ROOT / "scripts" / "distill.py"), *args,
    ]  # fmt: skip


def launch_env(**env: str) -> dict[str, str]:
    """The environment of a launch: no CUDA, one thread each, ``env`` added (``UNIREP_KILL_AT``
    only when given)."""
    full = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    full.pop("UNIREP_KILL_AT", None)
    return {**full, **env}


def _launch(port: int, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """``scripts/distill.py args`` under ``accelerate launch --multi_gpu`` with 2 CPU processes
    (one thread each), ``env`` added to the environment (``UNIREP_KILL_AT`` only when given)."""
    return subprocess.run(launch_command(port, args), capture_output=True, text=True,
                          env=launch_env(**env), timeout=600)  # fmt: skip


def without_timings(value: object, *drop: str) -> object:
    """``metrics.json`` content without the wall-clock entries (keys holding ``seconds``) and
    the keys ``drop``, which differ between two runs of the same computation."""
    if isinstance(value, dict):
        return {
            k: without_timings(v, *drop)
            for k, v in value.items()
            if "seconds" not in k and k not in drop
        }
    return value


def test_two_processes_share_training(tiny_cache: Path, tmp_path: Path) -> None:
    args = [
        *TINY, f"data.cache_dir={tiny_cache}", f"output_dir={tmp_path}", "name=ddp",
        "teachers.retrain=true", f"teachers.root={tmp_path / 'teachers'}",
    ]  # fmt: skip
    result = _launch(29517, args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["summary"]["num_processes"] == 2
    for task in metrics["tasks"].values():
        assert 0.0 <= task["student"]["accuracy"] <= 1.0
    # every process saved its own RNG state in the checkpoints: two ranks took part
    step = sorted((tmp_path / "ddp" / "checkpoints" / "student").glob("step_*"))[-1]
    assert {p.name for p in step.glob("rng_*.pt")} == {"rng_0.pt", "rng_1.pt"}
    assert result.stdout.count("student mean accuracy") == 1  # only the main process reports


def test_two_processes_killed_and_resumed_match_an_uninterrupted_run(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """Both ranks SIGKILLed after student step 3 (UNIREP_KILL_AT), then resumed: the student,
    metrics.json and results.json equal an uninterrupted 2-process run's (timings aside)."""

    def launch(name: str, port: int, kill_at: str | None = None, *extra: str):
        args = [*TINY, f"data.cache_dir={tiny_cache}", f"output_dir={tmp_path}", f"name={name}",
                "baseline=false", *extra]  # fmt: skip
        return _launch(port, args, **({"UNIREP_KILL_AT": kill_at} if kill_at else {}))

    whole = launch("whole", 29531)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-3000:]
    killed = launch("cut", 29533, "step:student:3")
    assert killed.returncode != 0
    assert not (tmp_path / "cut" / "metrics.json").exists()
    resumed = launch("cut", 29535, None, "resume=true")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "[student] resumed from" in resumed.stdout

    a, b = tmp_path / "whole", tmp_path / "cut"
    assert without_timings(json.loads((a / "metrics.json").read_text())) == without_timings(
        json.loads((b / "metrics.json").read_text())
    )
    assert (a / "results.json").read_bytes() == (b / "results.json").read_bytes()
    for name in ("model.safetensors",):
        assert (a / "student" / name).read_bytes() == (b / "student" / name).read_bytes()


def test_two_processes_train_the_partial_label_joint_terms(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """mini-scenes one-label with MTPSL and distillation on 2 processes: batches where a rank has
    no (unlabelled, labelled) pair leave the mapping network unused there, which DDP tolerates
    (every parameter takes part with a zero gradient); the run finishes with 2 processes."""
    args = [
        "--config", "mini-scenes-onelabel",
        *TINY_DENSE, "data.batch_size=2", f"data.cache_dir={tiny_cache}",
        f"output_dir={tmp_path}", "name=part", "baseline=false",
    ]  # fmt: skip
    result = _launch(29541, args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert metrics["summary"]["num_processes"] == 2
    assert metrics["summary"]["partial"]["method"] == "mtpsl"
    assert "train/mtpsl/loss" in (tmp_path / "part" / "logs" / "student.csv").read_text()


def test_two_processes_alternate_task_groups(tiny_cache: Path, tmp_path: Path) -> None:
    """``weighting=alternating`` on 2 processes: each group's step leaves the other tasks' heads
    and adapters without a gradient, which DDP is told to expect; the run finishes, both ranks
    taking part."""
    args = [
        "--config", "mini-scenes",
        *TINY_DENSE, "data.batch_size=2", f"data.cache_dir={tiny_cache}",
        f"output_dir={tmp_path}", "name=alt", "baseline=false",
        "weighting={name: alternating, kwargs: {group_size: 1}}",
    ]  # fmt: skip
    result = _launch(29543, args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "alt" / "metrics.json").read_text())
    assert metrics["summary"]["num_processes"] == 2
    step = sorted((tmp_path / "alt" / "checkpoints" / "student").glob("step_*"))[-1]
    assert {p.name for p in step.glob("rng_*.pt")} == {"rng_0.pt", "rng_1.pt"}
