"""Per-domain normalisation statistics (RGB mean and std of [0, 1] pixels).

The ten official Visual Decathlon domains use the figures of the reference implementation
(shipped as package data, ``decathlon_mean_std.json``). Any other domain, such as a synthetic
one or a user's own, gets its statistics computed once from its train images and cached as JSON
under ``<cache_dir>/stats/`` (never inside the data root, which may be read-only).
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from unirep.data.classification.decathlon import DecathlonDomain
from unirep.errors import CorruptImageError, DataError
from unirep.io import atomic_write_text

__all__ = ["domain_mean_std", "reference_mean_std"]


@cache
def _reference_table() -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
    text = (
        resources.files("unirep.data.classification")
        .joinpath("decathlon_mean_std.json")
        .read_text("utf-8")
    )
    table = json.loads(text)
    return {
        domain: (tuple(entry["mean"]), tuple(entry["std"]))
        for domain, entry in table.items()
        if not domain.startswith("_")
    }


def reference_mean_std() -> dict[str, tuple[list[float], list[float]]]:
    """The reference (mean, std) of each official Visual Decathlon domain."""
    return {d: (list(m), list(s)) for d, (m, s) in _reference_table().items()}


def _cache_path(domain: str, fingerprint: str, cache_dir: Path) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", domain)
    return Path(cache_dir) / "stats" / f"{safe}-{fingerprint[:16]}.json"


def _read_cache(path: Path, domain: str, fingerprint: str, max_images: int) -> dict | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    wanted = {"domain": domain, "fingerprint": fingerprint, "max_images": max_images}
    if not isinstance(entry, dict) or any(entry.get(k) != v for k, v in wanted.items()):
        return None
    return entry


def _write_atomically(path: Path, entry: dict) -> None:
    atomic_write_text(path, json.dumps(entry, indent=1))


def _sample_indices(n: int, max_images: int) -> list[int]:
    """Evenly spaced over the id-sorted list: deterministic and covers the whole split."""
    spaced = np.linspace(0, n - 1, num=min(n, max_images)).round().astype(np.int64)
    return np.unique(spaced).tolist()


def _source(dataset: Any) -> str:
    """The file (annotation file) or dataset a reader reads, for messages."""
    return str(getattr(dataset, "annotation_file", None) or repr(dataset))


def _compute(dataset: Any, indices: list[int]) -> tuple[list[float], list[float], int]:
    total = np.zeros(3)
    total_sq = np.zeros(3)
    pixels = 0
    for i in indices:
        try:
            image = dataset[i]["image"]
        except CorruptImageError:
            continue  # statistics do not need every image
        x = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255.0
        total += x.sum(axis=0)
        total_sq += (x * x).sum(axis=0)
        pixels += x.shape[0]
    if pixels == 0:
        raise DataError(
            f"no decodable train image among the {len(indices)} read from {_source(dataset)}"
        )
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - mean * mean, 0.0))
    if not (std > 0).all():
        raise DataError(
            f"the train images read from {_source(dataset)} have a constant channel (RGB std "
            f"{std.round(6).tolist()}), which normalisation would divide by"
        )
    return mean.tolist(), std.tolist(), pixels


def domain_mean_std(
    root: str | Path,
    domain: str,
    cache_dir: Path,
    max_images: int = 2000,
    train_set: Any = None,
) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) of a domain's [0, 1] RGB pixels.

    Args:
        root: Decathlon-format data root (see
            :class:`unirep.data.classification.decathlon.DecathlonDomain`).
        domain: Domain name. The ten official names return the reference figures at once.
        cache_dir: Where computed figures are cached, as ``cache_dir/stats/<domain>-<hash>.json``
            keyed by the domain and the fingerprint of the files read (``train_set.fingerprint``:
            the annotation file's bytes and the name, size and mtime of each image read, or the
            Hugging Face dataset's files); written atomically.
        max_images: At most this many train images, evenly spaced over the id-sorted split
            (deterministic), are read; undecodable ones are left out.
        train_set: The domain's train split returning PIL images, with a
            ``fingerprint(indices)`` method (a :class:`DecathlonDomain` or
            :class:`~unirep.data.classification.hf.HFDomain`); by default the Decathlon reader's
            train split under ``root``.

    Returns:
        ``(mean, std)``, three floats each.
    """
    reference = _reference_table()
    if domain in reference:
        mean, std = reference[domain]
        return list(mean), list(std)
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    dataset = train_set if train_set is not None else DecathlonDomain(root, domain, "train")
    if len(dataset) == 0:
        raise DataError(f"domain {domain!r} has no train images: {_source(dataset)} is empty")
    indices = _sample_indices(len(dataset), max_images)
    fingerprint = dataset.fingerprint(indices)
    path = _cache_path(domain, fingerprint, Path(cache_dir))
    cached = _read_cache(path, domain, fingerprint, max_images)
    if cached is not None:
        return list(cached["mean"]), list(cached["std"])
    mean, std, pixels = _compute(dataset, indices)
    entry = {
        "domain": domain,
        "fingerprint": fingerprint,
        "max_images": max_images,
        "root": str(Path(root).resolve()),  # where it was computed; not part of the key
        "pixels": pixels,
        "mean": mean,
        "std": std,
    }
    _write_atomically(path, entry)
    return mean, std
