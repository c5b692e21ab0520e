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
        # config files: a duplicate key, a looping base chain, bytes that are not UTF-8
        ("distill.py", ["--config", "{tmp}/dup.yaml"], "appears twice"),
        ("distill.py", ["--config", "{tmp}/loop_a.yaml"], "chain loops"),
        ("distill.py", ["--config", "{tmp}/latin.yaml"], "not UTF-8"),
        ("distill.py", ["--config", "mini-decathlon", "--config", "mini-scenes"], "twice"),
        # names: each once, and a run folder stays under output_dir
        ("distill.py", ["classification.domains=[objects, digits, digits]"], "more than once"),
        ("distill.py", ["classification.no_flip=[digits, digits]"], "more than once"),
        ("distill.py", ["name=../escaped"], "is not a folder name under output_dir"),
        ("distill.py", ["name=/tmp/elsewhere"], "is not a folder name under output_dir"),
        # a wrong domain is refused before any data is generated; a preset's value says so
        ("distill.py", ["classification.domains=[digits, faecs]"], "not a domain of data.source"),
        (
            "distill.py",
            ["classification.domains=[digits, glyphs, textures]"],
            "the value comes from 'mini-decathlon': override it",
        ),
    ],
)
def test_bad_input_exits_with_a_message_and_writes_nothing(
    tmp_path: Path, script: str, args: list[str], needle: str
) -> None:
    (tmp_path / "dup.yaml").write_text("train:\n  max_steps: 3\ntrain:\n  max_steps: 4\n")
    (tmp_path / "loop_a.yaml").write_text(f"base: {tmp_path / 'loop_b.yaml'}\n")
    (tmp_path / "loop_b.yaml").write_text(f"base: {tmp_path / 'loop_a.yaml'}\n")
    (tmp_path / "latin.yaml").write_bytes(b"train:\n  max_steps: 3  # caf\xe9\n")
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
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line
    assert not out.exists()
    assert not (tmp_path / "cache").exists()  # found before any data is generated or read
