"""Imports inside ``unirep/`` point one way: no cycle, and no package imports one above it.

The graph is read from the source with :mod:`ast`, like ``structure-check``: every ``import`` and
``from ... import`` anywhere in a file (function-level ones included), relative imports resolved,
``from a import b`` counted as an import of ``a.b`` when that is a module and of ``a`` otherwise.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "unirep"
STAGE_ONE = ("unirep.stage_one", ROOT / "teachers")  # installed under unirep's namespace
OUTSIDE = ("teachers", "scripts")  # never imported by their top-level names

LAYERS: list[tuple[str, ...]] = [
    ("unirep.errors", "unirep.version", "unirep.faults", "unirep.registry", "unirep.io",
     "unirep.layout"),
    ("unirep.config",),
    ("unirep.metrics",),
    ("unirep.tasks", "unirep.batch"),
    ("unirep.data",),
    ("unirep.models",),
    ("unirep.losses",),
    ("unirep.objective",),
    ("unirep.optim",),
    ("unirep.weighting",),
    ("unirep.teachers",),
    ("unirep.training",),
    ("unirep.stage_one",),
    ("unirep.pipeline",),
    ("unirep.experiments",),
    ("unirep.cli",),
    ("unirep", "unirep.__main__"),
]  # fmt: skip
"""The floor plan, bottom up: a module may import its own layer and the layers below it."""


def _module_files(package: Path, extra: tuple[str, Path] | None = None) -> dict[str, Path]:
    """``{dotted name: file}`` of ``package`` (and of ``extra``: a package installed under
    another name, ``(name, folder)``)."""
    trees = [(package.name, package)] + ([extra] if extra else [])
    names = {}
    for prefix, folder in trees:
        for path in sorted(folder.rglob("*.py")):
            name = ".".join([prefix, *path.relative_to(folder).with_suffix("").parts])
            names[name.removesuffix(".__init__")] = path
    return names


def _imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``module`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(
    package: Path = PACKAGE, extra: tuple[str, Path] | None = STAGE_ONE
) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the package modules it imports, module -> every dotted name it imports)."""
    files = _module_files(package, extra if package == PACKAGE else None)
    graph: dict[str, set[str]] = {m: set() for m in files}
    raw: dict[str, set[str]] = {}
    for module, path in files.items():
        raw[module] = _imported_names(module, path)
        for name in raw[module]:
            while name and name not in files:  # the longest prefix that is a module here
                name = name.rsplit(".", 1)[0] if "." in name else ""
            if name and name != module:
                graph[module].add(name)
    return graph, raw


def import_knots(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of size > 1: modules that import each other in a ring."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return components


def _cycle_through(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest path start → ... → start inside one strongly connected component."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is in no cycle")  # cannot happen in a component of size > 1


def test_no_import_cycle_in_unirep() -> None:
    graph, _ = import_graph()
    knots = import_knots(graph)
    assert not knots, (
        "import cycles in unirep/ (make one side import the other only): "
        + "; ".join(
            f"{' -> '.join(_cycle_through(graph, set(k), k[0]))} (modules in that knot: {k})"
            for k in knots
        )
    )


def layer(module: str) -> int:
    """The index in :data:`LAYERS` of the longest entry ``module`` belongs to."""
    found = [
        (len(name), i)
        for i, group in enumerate(LAYERS)
        for name in group
        if module == name or module.startswith(f"{name}.")
    ]
    assert found, f"{module} is in no layer of the floor plan (add it to LAYERS)"
    return max(found)[1]


def test_every_import_points_down_the_floor_plan() -> None:
    graph, _ = import_graph()
    upward = sorted(
        f"{module} (layer {layer(module)}) imports {name} (layer {layer(name)})"
        for module, names in graph.items()
        for name in names
        if layer(name) > layer(module)
    )
    assert not upward, "imports pointing up the floor plan: " + "; ".join(upward)


def test_the_library_keeps_a_thin_top_level() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 10, top


def test_unirep_never_imports_teachers_or_scripts() -> None:
    _, raw = import_graph()
    bad = sorted(
        f"{module} imports {name}"
        for module, names in raw.items()
        for name in names
        if name.split(".")[0] in OUTSIDE
    )
    assert not bad, "unirep/ must not import teachers/ or scripts/: " + "; ".join(bad)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"a.py": "import pkg.b\n", "b.py": "def f():\n    from pkg import a\n"},
         ["pkg.a", "pkg.b"]),
        ({"a.py": "from .sub import c\n", "sub/__init__.py": "", "sub/c.py": "from .. import a\n"},
         ["pkg.a", "pkg.sub.c"]),
        ({"a.py": "import pkg.b\n", "b.py": "import os\n"}, None),
    ],
)  # fmt: skip
def test_the_checker_finds_cycles(
    tmp_path: Path, files: dict[str, str], expected: list | None
) -> None:
    package = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    graph = import_graph(package)[0]
    knots = import_knots(graph)
    if expected is None:
        assert knots == []
    else:
        assert knots == [expected]
        cycle = _cycle_through(graph, set(expected), expected[0])
        assert cycle[0] == cycle[-1] == expected[0] and sorted(set(cycle)) == expected
