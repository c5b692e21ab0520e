"""Decoded samples kept in memory, within a size limit (``data.memory_cache_mib``).

Reading a training sample costs a file read and, for JPEG domains, a decode and a resize, on
every epoch; at the embedded benchmarks' sizes this is a third of a phase's wall time on 2 CPU
cores. A :class:`MemoryCache` keeps the deterministic part of a sample (the decoded image
resized to the training resolution, as uint8; a dense scene's arrays) the first time it is read,
until the run's budget is used up; the random part (crop, flip, scale) is still drawn per sample,
from the same generator in the same order, so a run computes exactly what it computes without the
cache (tested). Each process (and each data-loader worker) holds its own copy.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


class MemoryCache:
    """``get(key, make)``: ``make()``'s value, kept while the total stays within ``limit_mib``.

    Once the budget is used up, new values are returned without being kept (what is kept stays).
    Values are tensors or dicts / lists of tensors; callers must not modify them in place.
    """

    def __init__(self, limit_mib: float) -> None:
        self.limit = int(limit_mib * 1024 * 1024)
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._values: dict[Hashable, Any] = {}

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key in self._values:
            self.hits += 1
            return self._values[key]
        self.misses += 1
        value = make()
        size = _nbytes(value)
        if self.used + size <= self.limit:
            self._values[key] = value
            self.used += size
        return value

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return (
            f"MemoryCache({len(self)} samples, {self.used / 2**20:.1f} of "
            f"{self.limit / 2**20:.0f} MiB, {self.hits} hits, {self.misses} misses)"
        )


def memory_cache(limit_mib: float) -> MemoryCache | None:
    """The run's cache, or None when ``data.memory_cache_mib`` is 0 (off)."""
    return MemoryCache(limit_mib) if limit_mib > 0 else None
