"""``scripts/benchmark.py --variants SET``: which variants of a comparison set it times."""

from __future__ import annotations

import pytest

from unirep.cli.benchmark import benchmark_variants
from unirep.errors import ConfigError


def test_the_timed_variants_skip_the_plain_twins_and_add_the_every_step_update() -> None:
    pruning = benchmark_variants("pruning")
    assert next(iter(pruning)) == "shared" and not any(n.endswith("-plain") for n in pruning)
    assert "disparse-dynamic-90 every step" in pruning
    assert "interval: 1" in pruning["disparse-dynamic-90 every step"][0]
    assert set(benchmark_variants("saliency")) == {"shared", "srdml", "srdml-1"}
    assert not any(":" in n or n == "front" for n in benchmark_variants("balance"))


def test_an_unknown_set_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="valid sets are partial, xtask, balance"):
        benchmark_variants("gates")
