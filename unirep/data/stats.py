"""Per-domain normalisation statistics (RGB mean and std of [0, 1] pixels).

The ten official Visual Decathlon domains use the figures of the reference implementation
(shipped as package data, ``decathlon_mean_std.json``). Any other domain, such as a synthetic
one or a user's own, gets its statistics computed once from its train images and cached as JSON
under ``<cache_dir>/stats/`` (never inside the data root, which may be read-only).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from unirep.data.decathlon import CorruptImageError, DecathlonDomain

__all__ = ["domain_mean_std", "reference_mean_std"]


@cache
def _reference_table() -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
    text = resources.files("unirep.data").joinpath("decathlon_mean_std.json").read_text("utf-8")
    table = json.loads(text)
    return {
        domain: (tuple(entry["mean"]), tuple(entry["std"]))
        for domain, entry in table.items()
        if not domain.startswith("_")
    }


def reference_mean_std() -> dict[str, tuple[list[float], list[float]]]:
    """The reference (mean, std) of each official Visual Decathlon domain."""
    return {d: (list(m), list(s)) for d, (m, s) in _reference_table().items()}


def _cache_path(root: Path, domain: str, cache_dir: Path) -> Path:
    key = hashlib.sha256(f"{root}\0{domain}".encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", domain)
    return Path(cache_dir) / "stats" / f"{safe}-{key}.json"


def _read_cache(path: Path, root: Path, domain: str, max_images: int) -> dict | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    wanted = {"root": str(root), "domain": domain, "max_images": max_images}
    if any(entry.get(k) != v for k, v in wanted.items()):
        return None
    return entry


def _write_atomically(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _compute(
    root: Path, domain: str, max_images: int, dataset: Any = None
) -> tuple[list[float], list[float], int]:
    dataset = dataset if dataset is not None else DecathlonDomain(root, domain, "train")
    n = len(dataset)
    if n == 0:
        raise ValueError(f"domain {domain!r} has no train images under {root}")
    # evenly spaced over the id-sorted list: deterministic and covers the whole split
    indices = np.unique(np.linspace(0, n - 1, num=min(n, max_images)).round().astype(np.int64))
    total = np.zeros(3)
    total_sq = np.zeros(3)
    pixels = 0
    for i in indices.tolist():
        try:
            image = dataset[i]["image"]
        except CorruptImageError:
            continue  # statistics do not need every image
        x = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255.0
        total += x.sum(axis=0)
        total_sq += (x * x).sum(axis=0)
        pixels += x.shape[0]
    if pixels == 0:
        raise ValueError(f"no decodable train image for domain {domain!r} under {root}")
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - mean * mean, 0.0))
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
        root: Decathlon-format data root (see :class:`unirep.data.decathlon.DecathlonDomain`).
        domain: Domain name. The ten official names return the reference figures at once.
        cache_dir: Where computed figures are cached, as ``cache_dir/stats/<domain>-<hash>.json``
            keyed by the absolute data root and the domain; written atomically.
        max_images: At most this many train images, evenly spaced over the id-sorted split
            (deterministic), are read; undecodable ones are left out.
        train_set: The domain's train split returning PIL images (e.g. a Hugging Face domain);
            by default the Decathlon reader's train split under ``root``.

    Returns:
        ``(mean, std)``, three floats each.
    """
    reference = _reference_table()
    if domain in reference:
        mean, std = reference[domain]
        return list(mean), list(std)
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    abs_root = Path(root).resolve()
    path = _cache_path(abs_root, domain, Path(cache_dir))
    cached = _read_cache(path, abs_root, domain, max_images)
    if cached is not None:
        return list(cached["mean"]), list(cached["std"])
    mean, std, pixels = _compute(abs_root, domain, max_images, train_set)
    entry = {
        "root": str(abs_root),
        "domain": domain,
        "max_images": max_images,
        "pixels": pixels,
        "mean": mean,
        "std": std,
    }
    _write_atomically(path, entry)
    return mean, std
