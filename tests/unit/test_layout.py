"""One run-folder contract: every file and folder name unirep writes is spelled in
:mod:`unirep.layout` only, and the names hold what the docs say."""

from __future__ import annotations

import ast
from pathlib import Path

from unirep import layout

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [*sorted((ROOT / "unirep").rglob("*.py")), *sorted((ROOT / "teachers").rglob("*.py"))]

FILE_NAMES = {
    value
    for name, value in vars(layout).items()
    if name.isupper() and isinstance(value, str) and "." in value
}
FOLDER_NAMES = {
    layout.LOGS,
    layout.CHECKPOINTS,
    layout.STUDENT,
    layout.BACKBONE,
    layout.TEACHER_PHASE,
    layout.FUSION,
    layout.BRANCHING,
    layout.UNIT_MASKS,
    layout.PRUNING,
}


def _docstrings(tree: ast.AST) -> set[int]:
    kinds = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, kinds)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }


def _spelled(path: Path) -> list[str]:
    """``line: name`` of every layout name ``path`` spells in code: a file name as any string, a
    folder name where it is joined to a path (``x / "logs"``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in skip and node.value in FILE_NAMES:
            found.append(f"{node.lineno}: {node.value}")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and side.value in FOLDER_NAMES:
                    found.append(f"{side.lineno}: {side.value}")
    return found


def test_every_name_of_the_contract_is_spelled_once() -> None:
    spelled = {
        str(path.relative_to(ROOT)): hits
        for path in SOURCES
        if path.name != "layout.py" and (hits := _spelled(path))
    }
    assert not spelled, f"import these names from unirep.layout: {spelled}"


def test_the_checker_finds_a_spelled_name(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('"""metrics.json in a docstring is fine."""\nx = run / "logs" / "a.csv"\n'
                      'y = "metrics.json"\n')  # fmt: skip
    assert sorted(_spelled(module)) == ["2: logs", "3: metrics.json"]


def test_paths_are_built_from_the_names(tmp_path: Path) -> None:
    assert layout.log_file(tmp_path, "student") == tmp_path / "logs" / "student.csv"
    assert layout.checkpoint_dir(tmp_path, "baseline") == tmp_path / "checkpoints" / "baseline"
    assert layout.step_dir(tmp_path, 40) == tmp_path / "step_000040"
    assert layout.student_dir(tmp_path) == tmp_path / "student"
    assert layout.evaluation_file(tmp_path, "val", "full_label_") == (
        tmp_path / "evaluation_full_label_val.json"
    )
    assert len(FILE_NAMES) == len({v for k, v in vars(layout).items() if k.isupper()} - FOLDER_NAMES
                                  - {layout.STEP_PREFIX})  # fmt: skip
