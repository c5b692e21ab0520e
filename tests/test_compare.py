"""scripts/compare.py's table: variants parsed, best-of chosen on validation, mean ± std, Δm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unirep.compare import (
    PARTIAL_VARIANTS,
    Variant,
    parse_variants,
    resolve,
    summarise,
    write_comparison,
)
from unirep.config import ConfigError


def _metrics(miou: float, abs_err: float, val: float, dm: float) -> dict:
    return {
        "tasks": {
            "semantic": {"student": {"miou": miou, "pixel_acc": 0.5}},
            "depth": {"student": {"abs_err": abs_err, "rel_err": 0.2}},
        },
        "summary": {
            "delta_m_vs_teachers": dm,
            "selection": {"student": {"split": "val", "best_step": 4, "val_delta_m": val}},
        },
    }


def test_variants_parse_and_best_of_is_chosen_on_validation_never_test() -> None:
    variants = parse_variants(["supervised", "mtpsl", "jtr", "distill+best-of:mtpsl,jtr",
                               "mine=partial.weight=3;seed=2"])  # fmt: skip
    assert variants[0].overrides == PARTIAL_VARIANTS["supervised"]
    assert variants[-1] == Variant("mine", ["partial.weight=3", "seed=2"])
    by_name = {v.name: v for v in variants}
    # jtr is better on validation, mtpsl on test: validation decides
    results = {
        "mtpsl": [_metrics(0.9, 0.1, val=1.0, dm=9.0)],
        "jtr": [_metrics(0.1, 0.9, val=2.0, dm=-9.0)],
    }
    overrides, note = resolve(by_name["distill+best-of:mtpsl,jtr"], by_name, results)
    assert "partial.method=jtr" in overrides and "distill.enabled=true" in overrides
    assert "distill.enabled=false" not in overrides and "→ jtr" in note
    with pytest.raises(ConfigError, match="run mtpsl"):
        resolve(by_name["distill+best-of:mtpsl,jtr"], by_name, {})
    with pytest.raises(ConfigError, match="unique"):
        parse_variants(["jtr", "jtr"])
    with pytest.raises(ConfigError, match="variant 'nonsense'"):
        parse_variants(["nonsense"])


def test_summary_is_mean_and_std_over_seeds_with_delta_m_against_the_reference(
    tmp_path: Path,
) -> None:
    results = {
        "supervised": [_metrics(0.40, 0.50, 0, -2.0), _metrics(0.20, 0.50, 0, -4.0)],
        "mtpsl": [_metrics(0.44, 0.45, 0, 1.0), _metrics(0.22, 0.40, 0, 3.0)],
    }
    table = summarise(results, "supervised")
    assert table["mtpsl"]["semantic/miou"] == pytest.approx([0.33, 0.11 * 2**0.5])
    assert table["mtpsl"]["delta_m_vs_teachers"] == pytest.approx([2.0, 2**0.5])
    # seed 0: (+10 % miou, +10 % abs err), seed 1: (+10 %, +20 %): Δm 10 and 15
    assert table["mtpsl"]["delta_m_vs_supervised"] == pytest.approx([12.5, 5 / 2**0.5])
    assert table["supervised"]["delta_m_vs_supervised"] == [0.0, 0.0]
    content = write_comparison(tmp_path, "p", [0, 1], results, "supervised", ["a note"])
    assert json.loads((tmp_path / "comparison.json").read_text()) == json.loads(json.dumps(content))
    text = (tmp_path / "comparison.md").read_text()
    assert "| mtpsl |" in text and "+12.50 ± 3.54" in text and "- a note" in text
    assert (tmp_path / "comparison.png").stat().st_size > 0
