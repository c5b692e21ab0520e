"""The scripts fail cleanly on bad input: one line naming the problem, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("script", "args", "needle"),
    [
        ("distill.py", ["train.max_stepz=3"], "train.max_stepz"),
        ("train_teachers.py", ["train.max_stepz=3"], "train.max_stepz"),
        ("distill.py", ["distill.feature_loss=cka_rbff"], "cka_rbf"),
        ("train_teachers.py", ["data.source=decathlon", "data.root={tmp}/missing"], "missing"),
        ("distill.py", ["data.source=decathlon", "data.root={tmp}/missing"], "missing"),
        ("distill.py", ["--verbose"], "unexpected argument"),
        ("train_teachers.py", ["--config", "nyuv2"], "data.root"),
        ("distill.py", ["--config", "nyuv2", "data.root={tmp}/nyu"], "nyu"),
        (
            "distill.py",
            ["--config", "mini-scenes", "dense.tasks.edges={loss: cross_entropy}"],
            "edges",
        ),
        ("evaluate.py", ["--student", "{tmp}/nowhere"], "nowhere"),
    ],
)
def test_bad_input_exits_with_a_message_and_writes_nothing(
    tmp_path: Path, script: str, args: list[str], needle: str
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args, f"output_dir={out}",
         f"data.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert needle in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not out.exists()
