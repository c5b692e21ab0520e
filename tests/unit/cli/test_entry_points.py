"""One console command, ``unirep``, with subcommands; the scripts are shims of it.

``[project.scripts]`` names ``unirep = unirep.cli:main``; ``python -m unirep`` and
``scripts/<command>.py`` reach the same dispatcher, which imports a subcommand's module only when
it is called.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from unirep.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[3]


def test_pyproject_declares_the_one_command() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared == {"unirep": "unirep.cli:main"}


def test_every_script_is_a_shim_of_its_subcommand() -> None:
    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    assert scripts == {module for module, _ in COMMANDS.values()}
    for name, (module, _) in COMMANDS.items():
        text = (ROOT / "scripts" / f"{module}.py").read_text()
        assert f'main(command="{name}", prog="{module}.py")' in text
        assert len(text.splitlines()) < 10


def test_installed_entry_point_resolves_to_the_dispatcher() -> None:
    found = {e.name: e for e in entry_points(group="console_scripts")}
    if "unirep" not in found:
        pytest.skip("unirep is not installed here (pip install -e . installs it)")
    assert found["unirep"].load() is main


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as end:
        main(["--help"])
    assert end.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_an_unknown_subcommand_is_refused_in_one_line() -> None:
    with pytest.raises(SystemExit) as end:
        main(["distil"])
    message = str(end.value.code)
    assert "\n" not in message and "'distil'" in message and "distill" in message


def _installed() -> Path:
    executable = Path(sys.executable).parent / "unirep"
    if not executable.is_file():
        pytest.skip(f"{executable} is not installed (pip install -e . installs it)")
    return executable


def test_subcommand_help_runs_from_the_environment() -> None:
    result = subprocess.run([str(_installed()), "distill", "--help"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: unirep distill [--config PRESET_OR_PATH]")
    assert "mini-decathlon" in result.stdout


def test_python_dash_m_unirep_is_the_same_command() -> None:
    result = subprocess.run([sys.executable, "-m", "unirep", "--help"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and all(name in result.stdout for name in COMMANDS)


def test_a_bad_override_fails_in_one_line_naming_the_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(_installed()), "train-teachers", "train.max_stepz=3", f"output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "unirep train-teachers: configuration error" in result.stderr
    assert "train.max_stepz" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["distill", "train-teachers", "evaluate", "compare"])
def test_help_answers_without_loading_torch(command: str) -> None:
    """``--help`` lists the presets and keys at once: neither torch nor timm is imported."""
    code = (
        "import sys\nfrom unirep.cli import main\ntry:\n"
        f"    main([{command!r}, '--help'])\nexcept SystemExit as exit:\n"
        "    assert exit.code in (0, None)\n"
        "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "presets:" in out.stdout and "most used keys" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_import_unirep_is_light_and_timm_still_finds_its_architectures() -> None:
    code = (
        "import sys, unirep\nassert 'torch' not in sys.modules\nimport timm\n"
        "print(all(n in timm.list_models() for n in "
        "('resnet_decathlon_tiny', 'resnet26_decathlon', 'segnet_mtan')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
