"""SRDML's relation in a run's outputs (:mod:`unirep.pipeline.saliency`): the record from the
objective, or from the student's log when the phase was reloaded finished, and the report's
section with its figure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from unirep.losses.saliency import SaliencyRelations
from unirep.pipeline.saliency import saliency_record, saliency_section

TASKS = ["semantic", "depth", "normal"]


def _module() -> tuple[nn.Module, SaliencyRelations]:
    term = SaliencyRelations(TASKS, {"semantic": True, "depth": False, "normal": False})
    module = nn.Module()
    module.objective = nn.Module()
    module.objective.joint = nn.ModuleDict({"srdml": term})
    return module, term


def _log(path: Path, rows: list[tuple[int, str, float]]) -> Path:
    path.write_text("step,series,value\n" + "".join(f"{s},{n},{v}\n" for s, n, v in rows))
    return path


def test_no_srdml_term_no_record(tmp_path: Path) -> None:
    module = nn.Module()
    module.objective = nn.Module()
    module.objective.joint = nn.ModuleDict()
    assert saliency_record(module, tmp_path / "student.csv") is None


def test_a_trained_relation_comes_from_the_objective(tmp_path: Path) -> None:
    module, term = _module()
    term.relation.copy_(torch.tensor([0.5, 0.3, 0.2]))
    term.updates = 3
    record = saliency_record(module, tmp_path / "missing.csv")
    assert record is not None and record["source"] == "objective"
    assert record["relation"]["semantic-depth"] == pytest.approx(0.5)


def test_a_reloaded_phase_takes_the_last_logged_relation(tmp_path: Path) -> None:
    """A finished phase reloaded on resume has its best weights, not the objective's state."""
    module, _ = _module()
    prefix = "train/srdml/relation/"
    log = _log(tmp_path / "student.csv", [
        (10, f"{prefix}semantic-depth", 0.4), (10, f"{prefix}semantic-normal", 0.3),
        (10, f"{prefix}depth-normal", 0.3), (20, f"{prefix}semantic-depth", 0.2),
        (20, f"{prefix}semantic-normal", 0.7), (20, f"{prefix}depth-normal", 0.1),
    ])  # fmt: skip
    record = saliency_record(module, log)
    assert record is not None and record["source"] == "log" and record["step"] == 20
    assert record["relation"] == pytest.approx(
        {"semantic-depth": 0.2, "semantic-normal": 0.7, "depth-normal": 0.1}
    )
    assert record["closest"] == "semantic-normal" and record["matrix"][2][0] == pytest.approx(0.7)
    empty = saliency_record(module, _log(tmp_path / "other.csv", []))
    assert empty is not None and empty["source"] == "initial"


def test_the_section_draws_the_relation_and_tabulates_it(tmp_path: Path) -> None:
    _, term = _module()
    term.relation.copy_(torch.tensor([0.6, 0.3, 0.1]))
    metrics = {"summary": {"saliency": term.record()}}
    curves = {"student": {
        "train/srdml/relation/semantic-depth": [(1, 0.34), (2, 0.6)],
        "train/srdml/relation/semantic-normal": [(1, 0.33), (2, 0.3)],
        "train/srdml/relation/depth-normal": [(1, 0.33), (2, 0.1)],
        "train/srdml/distance/semantic-depth": [(1, 0.5), (2, 0.25)],
    }}  # fmt: skip
    text = saliency_section(tmp_path, metrics, curves)
    assert text.startswith("## How the tasks relate (SRDML)")
    assert "| semantic-depth | 0.600 | 0.25 |" in text and "| depth-normal | 0.100 | – |" in text
    assert "at most 0.9" in text and "**semantic-depth**" in text
    assert (tmp_path / "saliency.png").read_bytes().startswith(b"\x89PNG")
    assert saliency_section(tmp_path, {"summary": {}}, curves) == ""
