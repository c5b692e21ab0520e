"""The console commands of ``pyproject.toml`` are the scripts' commands (issue 14).

``[project.scripts]`` names one callable per script; installed (``pip install -e .``), each
resolves through ``importlib.metadata`` to the same ``cli`` function that ``scripts/<name>.py``
calls, and the executable in the environment's ``bin/`` runs it.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "unirep-distill": "distill",
    "unirep-train-teachers": "train_teachers",
    "unirep-evaluate": "evaluate",
    "unirep-benchmark": "benchmark",
    "unirep-compare": "compare",
}


def test_pyproject_declares_one_command_per_script() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared == {name: f"teachers.commands.{m}:cli" for name, m in COMMANDS.items()}
    for module in COMMANDS.values():  # each script runs that very function
        assert (
            f"from teachers.commands.{module} import cli"
            in (ROOT / "scripts" / f"{module}.py").read_text()
        )


@pytest.mark.parametrize("name", list(COMMANDS))
def test_installed_entry_point_resolves_to_the_command(name: str) -> None:
    found = {e.name: e for e in entry_points(group="console_scripts") if e.name in COMMANDS}
    if name not in found:
        pytest.skip(f"{name} is not installed here (pip install -e . installs it)")
    command = found[name].load()
    module = importlib.import_module(f"teachers.commands.{COMMANDS[name]}")
    assert callable(command) and command is module.cli


def _installed(name: str) -> Path:
    executable = Path(sys.executable).parent / name
    if not executable.is_file():
        pytest.skip(f"{executable} is not installed (pip install -e . installs it)")
    return executable


def test_unirep_distill_help_runs_from_the_environment() -> None:
    result = subprocess.run([str(_installed("unirep-distill")), "--help"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: unirep-distill [--config PRESET_OR_PATH]")
    assert "mini-decathlon" in result.stdout


def test_a_bad_override_fails_in_one_line_naming_the_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(_installed("unirep-train-teachers")), "train.max_stepz=3", f"output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "unirep-train-teachers: configuration error" in result.stderr
    assert "train.max_stepz" in result.stderr and "Traceback" not in result.stderr
