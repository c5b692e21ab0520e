"""The documentation: a short README, docs/ pages that link to what exists and are all in
mkdocs.yml's nav, and every command's config overrides valid under the current schema.

Fast and offline: no command is run; each command's ``--config`` preset and ``key=value``
overrides are read and validated as the command would (``load_config``).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

from unirep.config.schema import Config
from unirep.errors import ConfigError
from unirep.pipeline.validate import load_config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS = ROOT / "mkdocs.yml"
README_MAX_LINES = 300

PAGES = sorted(DOCS.glob("*.md"))
MARKDOWN = [README, *PAGES]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)

SECTIONS = {f.name for f in dataclasses.fields(Config)}
"""Top-level config keys: an override's first dotted part is one of them."""
OVERRIDE = re.compile(r"^([a-z_][a-z0-9_]*)(\.[\w<>.-]+)?=")
COMMANDS = {"distill", "train_teachers", "train-teachers", "evaluate", "benchmark", "compare"}
"""The commands that take ``--config`` and overrides (``aggregate`` takes run folders)."""
PLACEHOLDERS = ("/path/to", "...", "<", "$")
"""An override holding one of these is a placeholder: its command is not checked."""
SHELL_VARIABLE = re.compile(r"\$\{?\w+\}?")
SEPARATORS = {";", "&&", "||", "|", "do", "done", "then", "fi"}


def _relative(name: str) -> str:
    return str(Path(name).relative_to(ROOT))


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks (links inside code are not links)."""
    return FENCE.sub("", text)


def _links(path: Path) -> list[str]:
    """The relative link targets of a Markdown file (no URLs, no in-page anchors)."""
    targets = []
    for target in LINK.findall(_prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def _nav_pages(nav: object) -> list[str]:
    """Every page file named in a mkdocs nav (nested sections included)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return []


def _shell_blocks(path: Path) -> list[str]:
    """The ``sh``/``bash`` blocks of a Markdown file, continuation lines joined."""
    text = path.read_text(encoding="utf-8")
    blocks = [body for lang, body in FENCE.findall(text) if lang in ("sh", "bash", "shell")]
    return [re.sub(r"\\\n", " ", body) for body in blocks]


def _segments(line: str) -> list[list[str]]:
    """A shell line as its simple commands: tokens split at ``;``, ``&&``, ``|``, ``do``..."""
    tokens = shlex.split(line, comments=True)
    segments: list[list[str]] = [[]]
    for token in tokens:
        end = token.endswith(";") and token != ";"
        token = token.rstrip(";") if end else token
        if token in SEPARATORS:
            segments.append([])
            continue
        segments[-1].append(token)
        if end:
            segments.append([])
    return [s for s in segments if s]


def _command(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(name, arguments) when ``tokens`` runs a unirep command: ``scripts/<name>.py``,
    ``unirep <name>`` or ``-m unirep <name>``; None otherwise."""
    for i, token in enumerate(tokens):
        match = re.fullmatch(r"(?:.*/)?scripts/(\w+)\.py", token)
        if match and match.group(1) in COMMANDS:
            return match.group(1), tokens[i + 1 :]
        if token == "unirep" and i + 1 < len(tokens) and tokens[i + 1] in COMMANDS:
            return tokens[i + 1], tokens[i + 2 :]
    return None


def _config_arguments(args: list[str]) -> tuple[str | None, list[str]]:
    """(the ``--config`` preset, the config overrides) of a command's arguments. Shell variables
    (``seed=$s``) read as 0; ``data.root=`` is left out (a dataset on the user's disk)."""
    preset = None
    overrides = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            preset = args[i + 1]
        elif arg.startswith("--config="):
            preset = arg.split("=", 1)[1]
        match = OVERRIDE.match(arg)
        if not match or match.group(1) not in SECTIONS or arg.startswith("data.root="):
            continue
        overrides.append(SHELL_VARIABLE.sub("0", arg))
    return preset, overrides


def _invocations() -> list[tuple[str, str, str | None, list[str]]]:
    """(where, the command line, preset, overrides) of every unirep command in a shell block
    of the README and docs/, placeholders left out."""
    found = []
    for path in MARKDOWN:
        for block in _shell_blocks(path):
            for line in block.splitlines():
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                for tokens in _segments(line):
                    command = _command(tokens)
                    if command is None:
                        continue
                    preset, overrides = _config_arguments(command[1])
                    placeholders = [preset or "", *overrides]
                    if any(p in arg for arg in placeholders for p in PLACEHOLDERS):
                        continue
                    found.append((_relative(str(path)), line.strip(), preset, overrides))
    return found


INVOCATIONS = _invocations()


def test_the_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: _relative(str(p)))
def test_relative_links_point_to_files(path: Path) -> None:
    missing = [t for t in _links(path) if t and not (path.parent / t).exists()]
    assert not missing, f"{_relative(str(path))} links to missing files: {missing}"


def test_every_page_is_in_the_nav() -> None:
    config = yaml.load(MKDOCS.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    nav = set(_nav_pages(config["nav"]))
    pages = {p.name for p in PAGES}
    assert pages - nav == set(), "docs/ pages missing from mkdocs.yml's nav"
    assert nav - pages == set(), "mkdocs.yml's nav names pages that docs/ does not have"


def test_the_readme_links_to_the_docs() -> None:
    linked = {Path(t).name for t in _links(README) if t.startswith("docs/")}
    assert {"index.md", "configuration.md", "changes.md"} <= linked


def test_commands_are_found() -> None:
    """The scanner sees the commands (a change to its parsing must not silently check none)."""
    where = {w for w, *_ in INVOCATIONS}
    assert "README.md" in where and "docs/configuration.md" in where
    assert len(INVOCATIONS) >= 30


@pytest.mark.parametrize(
    ("where", "line", "preset", "overrides"),
    INVOCATIONS,
    ids=[f"{w}:{i}" for i, (w, *_) in enumerate(INVOCATIONS)],
)
def test_command_overrides_load(
    where: str, line: str, preset: str | None, overrides: list[str]
) -> None:
    """Each command's preset and overrides bind and validate (0.4 keys, known names)."""
    try:
        load_config(preset, overrides)
    except ConfigError as err:
        pytest.fail(f"{where}: {line}\n  {err}")
