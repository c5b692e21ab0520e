"""What a user breaks, met as a user meets it: the commands typed in a shell (and
``unirep.load_student`` from ``python -c``) on an output folder that cannot be written, a damaged
cached teacher or a damaged exported student. Each is one line naming the file and what to do,
never a traceback; output-side problems are found before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import TINY

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _python(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, *args],
        capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT,
    )  # fmt: skip


def _script(script: str, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return _python(str(ROOT / "scripts" / script), *args, prefix=prefix)


def _one_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with exactly one line on stderr, holding every needle."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (``<out>/run``), its teachers in ``<out>/teachers``."""
    out = tmp_path_factory.mktemp("user-errors")
    result = _script("distill.py", *_distill_args(tiny_cache, out, "name=run", "baseline=false"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run"


def _distill_args(cache: Path, out: Path, *extra: str, teachers: Path | None = None) -> list[str]:
    """The tiny run's command line; its teachers in ``teachers`` (default ``<out>/teachers``)."""
    return [*TINY, f"data.cache_dir={cache}", f"output_dir={out}",
            f"teachers.root={teachers or out / 'teachers'}", *extra]  # fmt: skip


# --- the output folder: a folder, writable, with space; checked before any work --------------


@pytest.mark.parametrize("where", ["output_dir=file", "output_dir=file/runs", "name=file"])
def test_an_output_path_through_a_file(
    finished: Path, tiny_cache: Path, tmp_path: Path, where: str
) -> None:
    (tmp_path / "file").write_text("not a folder\n")
    key, value = where.split("=")
    out, name = (tmp_path / value, "new") if key == "output_dir" else (tmp_path, value)
    args = _distill_args(tiny_cache, out, f"name={name}", teachers=finished.parent / "teachers")
    line = _one_line(_script("distill.py", *args), "output_dir", str(tmp_path / "file"))
    assert "is a file, not a folder" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def _read_only(folder: Path) -> tuple[str, ...] | None:
    """A command prefix under which ``folder`` is read-only (``chmod`` for a user; for root, who
    writes through permissions, a read-only bind mount in its own mount namespace), or None."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return ()
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    prefix = ("unshare", "-m", "sh", "-c", script, str(folder))
    if shutil.which("unshare") is None:
        return None
    touch = 'touch "$0/probe" 2>/dev/null; echo mounted'  # reached only once mounted
    probe = subprocess.run(
        [*prefix, "sh", "-c", touch, str(folder)], capture_output=True, text=True
    )
    return prefix if probe.stdout.strip() == "mounted" and not any(folder.iterdir()) else None


def test_a_read_only_output_dir(finished: Path, tiny_cache: Path, tmp_path: Path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    prefix = _read_only(folder)
    if prefix is None:
        pytest.skip("cannot make a read-only folder here (root without mount namespaces)")
    try:
        args = _distill_args(tiny_cache, folder / "runs", "name=new",
                             teachers=finished.parent / "teachers")  # fmt: skip
        result = _script("distill.py", *args, prefix=prefix)
    finally:
        folder.chmod(0o755)
    line = _one_line(result, "output_dir", f"cannot write in {str(folder)!r}")
    assert "writable" in line
    assert list(folder.iterdir()) == []


def test_too_little_free_space(finished: Path, tiny_cache: Path, tmp_path: Path) -> None:
    """The disk looks 50 MiB short of free: refused before the run folder is made."""
    args = _distill_args(tiny_cache, tmp_path, "name=new", teachers=finished.parent / "teachers")
    code = (
        "import runpy, shutil, sys; from collections import namedtuple; "
        "usage = namedtuple('usage', 'total used free'); "
        "shutil.disk_usage = lambda path: usage(1 << 40, (1 << 40) - (50 << 20), 50 << 20); "
        f"sys.argv = {[str(ROOT / 'scripts' / 'distill.py'), *args]!r}; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    line = _one_line(_python("-c", code), "output_dir", "only 50 MiB free", str(tmp_path))
    assert "at least 100 MiB" in line
    assert list(tmp_path.iterdir()) == []


def test_evaluate_checks_its_output_before_reading_data(finished: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder\n")
    result = _script("evaluate.py", "--config", str(finished / "config.yaml"),
                     "--student", str(finished), f"output_dir={tmp_path / 'file'}")  # fmt: skip
    _one_line(result, "output_dir", str(tmp_path / "file"), "is a file")


# --- a damaged cached teacher: named, with how to get it retrained ----------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


TEACHER_DAMAGE: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "truncated manifest": (lambda d: _truncate(d / "teacher.json"), "teacher.json",
                           "cannot be read"),
    "deleted weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors",
                        "do not exist"),
    "replaced weights": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors",
                         "replaced or corrupted"),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(TEACHER_DAMAGE))
def test_a_damaged_cached_teacher(
    finished: Path, tiny_cache: Path, tmp_path: Path, damage: str
) -> None:
    teachers = tmp_path / "teachers"
    shutil.copytree(finished.parent / "teachers", teachers)
    hurt, file, needle = TEACHER_DAMAGE[damage]
    for folder in teachers.iterdir():  # whichever the run loads first is named
        hurt(folder)
    args = _distill_args(tiny_cache, tmp_path / "runs", "name=new", teachers=teachers)
    line = _one_line(_script("distill.py", *args), str(teachers), file, needle)
    assert "delete the folder" in line and "teachers.retrain=true" in line
    # the refused run leaves no folder behind: the same command, once fixed, is not refused
    assert not (tmp_path / "runs" / "new").exists()


# --- a damaged exported student: evaluate.py and unirep.load_student --------------------------


def _edit_manifest(folder: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _rename_task(m: dict) -> None:
    m["tasks"]["digitz"] = m["tasks"].pop("digits")
    m["preprocessing"]["digitz"] = m["preprocessing"].pop("digits")
    m["tasks"]["digitz"]["stream"] = "digitz"


def _more_classes(m: dict) -> None:
    m["tasks"]["digits"]["num_classes"] += 1
    m["tasks"]["digits"]["class_names"].append("extra")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


STUDENT_DAMAGE: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "weights fail the hash": (lambda s: _flip_byte(s / "model.safetensors"), "model.safetensors",
                              "replaced or corrupted"),
    "manifest not JSON": (lambda s: _truncate(s / "manifest.json"), "manifest.json",
                          "cannot be read"),
    "task renamed": (lambda s: _edit_manifest(s, _rename_task), "model.safetensors",
                     "a task was renamed"),
    "class count changed": (lambda s: _edit_manifest(s, _more_classes), "model.safetensors",
                            "shape mismatches"),
    "unknown format": (lambda s: _edit_manifest(s, lambda m: m.update(format="unirep-student/9")),
                       "manifest.json", "format 'unirep-student/9'"),
    "unknown architecture": (
        lambda s: _edit_manifest(s, lambda m: m["architecture"].update(backbone="resnet_huge")),
        "manifest.json", "cannot build"),
}  # fmt: skip


@pytest.fixture
def damaged_student(request: pytest.FixtureRequest, finished: Path, tmp_path: Path):
    student = tmp_path / "student"
    shutil.copytree(finished / "student", student)
    hurt, file, needle = STUDENT_DAMAGE[request.param]
    hurt(student)
    return student, str(student / file), needle


@pytest.mark.parametrize("damaged_student", list(STUDENT_DAMAGE), indirect=True)
def test_evaluate_a_damaged_student(
    damaged_student: tuple[Path, str, str], finished: Path, tmp_path: Path
) -> None:
    student, file, needle = damaged_student
    out = tmp_path / "evals"
    result = _script("evaluate.py", "--config", str(finished / "config.yaml"),
                     "--student", str(student), f"output_dir={out}")  # fmt: skip
    _one_line(result, "evaluate.py: error: ", file, needle)
    assert not out.exists()  # found before anything is written


@pytest.mark.parametrize("damaged_student", list(STUDENT_DAMAGE), indirect=True)
def test_load_a_damaged_student(damaged_student: tuple[Path, str, str]) -> None:
    """From Python the error is raised: a UnirepError, one line, not chained to another."""
    student, file, needle = damaged_student
    result = _python("-c", f"import unirep; unirep.load_student({str(student)!r})")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("unirep.errors.StudentError: "), result.stderr[-3000:]
    assert file in last and needle in last
    assert "During handling" not in result.stderr and "direct cause" not in result.stderr


def test_an_intact_student_still_evaluates(finished: Path, tmp_path: Path) -> None:
    result = _script("evaluate.py", "--config", str(finished / "config.yaml"),
                     "--student", str(finished), f"output_dir={tmp_path}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / f"eval-{finished.name}-test" / "metrics.json").is_file()
