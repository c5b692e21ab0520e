"""Multi-domain sampling: every training step draws one batch from every domain.

Each domain's order is a deterministic function of (seed, domain, epoch) and the global step, so
a resumed run continues exactly where it stopped, and the processes of a distributed run read
disjoint shards (no rank reads every file).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class StepBatchSampler(Sampler[list[int]]):
    """Infinite batches of one process's shard, starting at global step ``start_step``.

    An epoch is ``len(dataset) // (batch_size · world_size)`` steps; epoch ``e`` uses the
    permutation seeded by ``seed + e``; process ``rank`` takes every ``world_size``-th index.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        name: str = "dataset",
    ) -> None:
        self.steps_per_epoch = num_samples // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{name} has {num_samples} training samples, fewer than one batch of "
                f"{batch_size} per process × {world_size} processes; lower data.batch_size"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_step = start_step

    def batch(self, step: int) -> list[int]:
        """The indices this process reads at global step ``step``."""
        epoch, j = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.num_samples, generator=generator)
        used = perm[: self.steps_per_epoch * self.batch_size * self.world_size]
        mine = used[self.rank :: self.world_size]
        return mine[j * self.batch_size : (j + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


class DrawBatchSampler(StepBatchSampler):
    """:class:`StepBatchSampler`'s batches, each index paired with the
    draw it reads: ``[(index, draw), ...]``, the draws uniform over ``range(draws)`` from a
    generator seeded by the sampler's seed and the global step (so a resume reads the same)."""

    def __init__(self, *args: Any, draws: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        self.draws = draws

    def draws_at(self, step: int, n: int) -> list[int]:
        """The draw of each of the ``n`` samples of global step ``step``."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + 7 + step * 2)
        return torch.randint(self.draws, (n,), generator=generator).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:  # type: ignore[override]
        step = self.start_step
        while True:
            batch = self.batch(step)
            yield list(zip(batch, self.draws_at(step, len(batch)), strict=True))
            step += 1


class MultiDomainStream:
    """One infinite loader per domain; ``next(stream)`` gives ``{domain: batch}``.

    ``draws > 0``: each index comes paired with one of ``draws`` pre-drawn augmentations,
    ``(index, draw)`` (:class:`DrawBatchSampler`), for datasets read through
    :class:`unirep.teachers.output_cache.SeededDraws` (the teacher-output cache).
    """

    def __init__(
        self,
        datasets: dict[str, Dataset],
        batch_sizes: dict[str, int],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        num_workers: int = 0,
        draws: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.loaders: dict[str, Any] = {}
        for i, (domain, dataset) in enumerate(datasets.items()):
            kind, extra = (DrawBatchSampler, {"draws": draws}) if draws else (StepBatchSampler, {})
            sampler = kind(
                len(dataset),  # type: ignore[arg-type]
                batch_sizes[domain],
                seed=seed * 1000 + i,
                rank=rank,
                world_size=world_size,
                start_step=start_step,
                name=f"domain {domain!r}",
                **extra,
            )
            loader = DataLoader(
                dataset,
                batch_sampler=sampler,
                num_workers=num_workers,
                persistent_workers=num_workers > 0,
                pin_memory=pin_memory,  # on CUDA: page-locked batches, copied asynchronously
            )
            self.loaders[domain] = iter(loader)

    def __iter__(self) -> MultiDomainStream:
        return self

    def __next__(self) -> dict[str, dict[str, Any]]:
        return {domain: next(it) for domain, it in self.loaders.items()}
