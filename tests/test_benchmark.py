"""The benchmark measures and reports sane figures (the numbers themselves go to the README)."""

from __future__ import annotations

import pytest

from unirep.benchmark import measure_step
from unirep.config import load_config


@pytest.mark.parametrize("distill", [False, True])
def testmeasure_step_reports_positive_figures(distill: bool) -> None:
    cfg = load_config(None, ["data.batch_size=4", "cpu=true"])
    result = measure_step(cfg, distill, {"a": 3, "b": 5}, steps=2, warmup=1)
    assert result["steps_per_second"] > 0 and result["peak_memory_mib"] > 0
    assert result["images_per_second"] == pytest.approx(8 * result["steps_per_second"])
