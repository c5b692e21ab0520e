"""The scripts fail cleanly on bad input: one line naming the problem, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train.max_stepz=3"], "train.max_stepz"),
        (["distill.feature_loss=cka_rbff"], "cka_rbf"),
        (["data.source=decathlon", "data.root={tmp}/missing"], "missing"),
        (["--verbose"], "unexpected argument"),
        (["--config", "nyuv2"], "data.root"),
        (["--config", "nyuv2", "data.root={tmp}/nyu"], "nyu"),
        (["--config", "mini-scenes", "dense.tasks.edges={loss: cross_entropy}"], "edges"),
    ],
)
@pytest.mark.parametrize("script", ["distill.py", "train_teachers.py"])
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
