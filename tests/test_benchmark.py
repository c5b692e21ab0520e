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


@pytest.mark.parametrize("cross", ["null", "{name: densemtl, kwargs: {pool: 4}}"])
@pytest.mark.parametrize("distill", [False, True])
def test_dense_step_is_measured(distill: bool, cross: str) -> None:
    cfg = load_config(
        "mini-scenes",
        ["data.batch_size=2", "cpu=true", "dense.encoder.kwargs={width_mult: 0.125}",
         "dense.decoder_channels=8", f"dense.cross_task={cross}"],
    )  # fmt: skip
    result = measure_step(cfg, distill, {}, steps=2, warmup=1, dense_size=(32, 48))
    assert result["steps_per_second"] > 0 and result["peak_memory_mib"] > 0
    assert result["images_per_second"] == pytest.approx(2 * result["steps_per_second"])
    with pytest.raises(ValueError, match="dense_size"):
        measure_step(cfg, distill, {}, steps=1, warmup=0)
