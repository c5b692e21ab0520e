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


@pytest.mark.parametrize("memory", [0, 64])
@pytest.mark.parametrize("train", [True, False])
def test_a_batch_transformed_at_once_equals_the_samples_one_by_one(
    memory: int, train: bool, tiny_cache: Path, tmp_path: Path
) -> None:
    """``__getitems__`` (the DataLoader's batched fetch: one flip, float conversion and
    normalisation for the whole batch) gives the samples, draws and ``aug`` records of
    ``[dataset[i] for i in indices]``, bit for bit, with and without the memory cache."""
    data = build_run_data(tiny_config(tiny_cache, tmp_path, f"data.memory_cache_mib={memory}"))
    for dataset in data.datasets("train", train=train).values():
        indices = [0, 3, 1, 0, 3, 2, 5, 4]
        for seed in (0, 1):
            one_by_one = _samples(dataset, indices, seed)
            torch.manual_seed(seed)
            batched = dataset.__getitems__(indices)
            _assert_same(batched, one_by_one)
            assert torch.rand(1).item() == _after(dataset, indices, seed)  # the same draws


def _after(dataset, indices: list[int], seed: int) -> float:
    """The next draw of the global generator after reading ``indices`` one by one."""
    _samples(dataset, indices, seed)
    return torch.rand(1).item()


def test_the_training_loader_uses_the_batched_fetch(tiny_cache: Path, tmp_path: Path) -> None:
    from unirep.data.classification.decathlon import DecathlonDomain
    from unirep.data.sampling import MultiDomainStream

    data = build_run_data(tiny_config(tiny_cache, tmp_path))
    sets = data.datasets("train", train=True)
    calls = []
    original = DecathlonDomain.__getitems__

    def spy(self, indices):
        calls.append(len(indices))
        return original(self, indices)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DecathlonDomain, "__getitems__", spy)
        batch = next(MultiDomainStream(sets, data.batch_sizes(), seed=0))
    assert calls == [data.batch_sizes()[s] for s in sets]
    assert all(b["image"].shape[0] == data.batch_sizes()[s] for s, b in batch.items())
