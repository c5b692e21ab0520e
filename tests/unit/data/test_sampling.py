"""Multi-domain sampling: deterministic, resumable from a step, disjoint shards across processes."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import Dataset

from unirep.data.sampling import MultiDomainStream, StepBatchSampler


def test_epochs_cover_every_sample_once() -> None:
    sampler = StepBatchSampler(20, batch_size=5, seed=3)
    assert sampler.steps_per_epoch == 4
    epoch0 = [i for s in range(4) for i in sampler.batch(s)]
    epoch1 = [i for s in range(4, 8) for i in sampler.batch(s)]
    assert sorted(epoch0) == list(range(20)) == sorted(epoch1)
    assert epoch0 != epoch1  # reshuffled each epoch


def test_resume_from_a_step_continues_the_same_order() -> None:
    full = list(itertools.islice(iter(StepBatchSampler(37, 4, seed=1)), 25))
    resumed = list(itertools.islice(iter(StepBatchSampler(37, 4, seed=1, start_step=10)), 15))
    assert resumed == full[10:]


def test_processes_read_disjoint_shards() -> None:
    ranks = [StepBatchSampler(40, 5, seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].steps_per_epoch == 4
    for step in range(4):
        a, b = ranks[0].batch(step), ranks[1].batch(step)
        assert not set(a) & set(b)
    seen = [i for r in ranks for s in range(4) for i in r.batch(s)]
    assert sorted(seen) == list(range(40))


def test_too_small_domain_names_it() -> None:
    with pytest.raises(ValueError, match="tiny-domain"):
        StepBatchSampler(3, 4, seed=0, name="tiny-domain")


class _Numbers(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": torch.tensor([float(i)]), "label": torch.tensor(i)}


def test_stream_gives_one_batch_per_domain() -> None:
    stream = MultiDomainStream({"a": _Numbers(10), "b": _Numbers(30)}, {"a": 2, "b": 5}, seed=0)
    batch = next(stream)
    assert set(batch) == {"a", "b"}
    assert batch["a"]["label"].shape == (2,) and batch["b"]["label"].shape == (5,)
    for _ in range(20):  # domains of different sizes cycle independently
        next(stream)


def test_worker_processes_give_the_same_batches() -> None:
    data = {"a": _Numbers(10), "b": _Numbers(30)}
    inline = MultiDomainStream(data, {"a": 2, "b": 5}, seed=0, num_workers=0)
    workers = MultiDomainStream(data, {"a": 2, "b": 5}, seed=0, num_workers=2)
    for _ in range(12):
        x, y = next(inline), next(workers)
        for d in data:
            assert torch.equal(x[d]["label"], y[d]["label"])
