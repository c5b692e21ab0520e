"""Decoded samples kept in memory (data.memory_cache_mib): the same samples, the same run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import fit_interrupted, tiny_config, tiny_dense_config
from unirep.data.memory import MemoryCache
from unirep.data.streams import build_run_data


def test_the_budget_keeps_values_until_it_is_used_up() -> None:
    cache = MemoryCache(limit_mib=1 / 1024)  # 1 KiB
    made: list[int] = []

    def make(i: int) -> torch.Tensor:
        made.append(i)
        return torch.zeros(100, dtype=torch.float32)  # 400 bytes

    for _ in range(2):
        for i in range(4):
            cache.get(i, lambda i=i: make(i))
    assert len(cache) == 2 and cache.used == 800  # the third would pass 1 KiB
    assert made == [0, 1, 2, 3, 2, 3]  # kept ones are made once, the others every time
    assert cache.hits == 2 and cache.misses == 6


def _samples(dataset, indices: list[int], seed: int) -> list[dict]:
    torch.manual_seed(seed)  # the classification crops draw from the global generator
    generator = getattr(dataset, "generator", None)
    if generator is not None:
        generator.manual_seed(seed)
    return [dataset[i] for i in indices]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key, value in x.items():
            other = y[key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), key
            elif isinstance(value, dict):
                assert all(torch.equal(value[k], other[k]) for k in value), key
            else:
                assert value == other, key


@pytest.mark.parametrize("kind", ["classification", "dense"])
def test_cached_samples_equal_decoded_ones_with_the_same_draws(
    kind: str, tiny_cache: Path, tmp_path: Path
) -> None:
    build = tiny_config if kind == "classification" else tiny_dense_config
    plain = build_run_data(build(tiny_cache, tmp_path))
    cached = build_run_data(build(tiny_cache, tmp_path, "data.memory_cache_mib=64"))
    for train in (True, False):
        for stream, dataset in plain.datasets("train", train=train).items():
            other = cached.datasets("train", train=train)[stream]
            indices = [0, 3, 1, 0, 3, 2]  # repeats: the second read comes from memory
            for seed in (0, 1):
                _assert_same(_samples(dataset, indices, seed), _samples(other, indices, seed))
    memory = getattr(cached, "domains", None) or getattr(cached, "data", None)
    store = getattr(memory, "memory", None) or getattr(memory, "_memory", None)
    assert store is not None and store.hits > 0 and len(store) > 0


@pytest.mark.slow
def test_a_run_with_the_memory_cache_computes_the_same(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    states = []
    for limit in (0, 64):
        folder = tmp_path / f"m{limit}"
        cfg = tiny_dense_config(tiny_cache, folder, f"data.memory_cache_mib={limit}")
        phase, _ = fit_interrupted(cfg, folder, "baseline", None, monkeypatch)
        states.append({k: v.clone() for k, v in phase.module.state_dict().items()})
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
