"""The teacher-output cache: FKD-style pre-drawn augmentations and the teachers' outputs on them.

Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition" (ECCV 2022) store,
for every training image, the soft labels of several random crops together with the crop
coordinates, then train the student on those same crops: the teachers never run during
distillation. Here, for each training sample of each stream and each of ``K`` draws
(``teachers.output_cache.draws``):

- the sample's augmentation is a deterministic function of ``(seed, index, draw)``: the dataset is
  read with torch's global RNG seeded from the three (:class:`SeededDraws`), so any dataset whose
  augmentation draws from torch's RNG (the Decathlon transform, the dense scale-crop and flip, a
  torchvision ``v2`` pipeline) gives the same sample again, without replay code. The draw's
  ``"aug"`` record is stored and compared at every read: a dataset that draws elsewhere fails with
  a one-line error instead of training on crops the teachers never saw;
- the teachers' outputs the objective reads (``"features"`` for the feature and contrastive terms,
  ``"pred"`` for the tasks with a prediction loss, :func:`needed_outputs`) are computed once and
  stored as ``float16`` (or ``float32``) ``.npy`` arrays ``[N, K, ...]``, memory-mapped when read;
- training draws one of the ``K`` draws per sample and step
  (:class:`~unirep.data.sampling.DrawBatchSampler`: a function of the run's seed and the step, so
  a resumed run reads the same draws), and the batch
  carries the cached outputs (:attr:`unirep.batch.Batch.teacher`) in place of a teacher forward.

The folder ``<teacher_root>/outputs/<stream>-<key[:12]>/`` is keyed by what determines its content
(:func:`cache_key`): every teacher's weights hash, the stream's data fingerprint and
preprocessing, the data settings that decide augmentation, ``K``, the draws' seed, the outputs
stored and their dtype, and the teachers' autocast. It is written once, into ``<folder>.tmp``,
and renamed into place when complete (all processes write their shard of the samples into the
same pre-allocated arrays); a finished folder is only ever read. Its manifest, written last and
sealed with its own sha256, records the format version and each array's sha256, shape and
dtype; :func:`open_store` verifies them all once, and a damaged folder (a changed value, a
truncated array, another format) is said in one line and built again.

What it changes: the student sees ``K`` augmentations of each image instead of a fresh one at
every epoch (FKD's trade-off; the baseline is unaffected), and the soft targets are rounded to
``float16``. What it saves: the teachers' forward at every step, once the cache exists (the build
costs ``K`` teacher passes over the training set, repaid when the student sees each image more
than ``K`` times, or at once by every later run with the same teachers and data: seeds, variants,
weightings of ``scripts/compare.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from unirep.batch import make_batch
from unirep.config.load import to_dict
from unirep.config.schema import Config
from unirep.data.streams import RunData
from unirep.errors import DataError, NonFiniteError
from unirep.io import file_sha256, read_json, read_sealed_json, write_sealed_json
from unirep.layout import OUTPUT_CACHE_MANIFEST
from unirep.tasks import Task

CACHE_FORMAT = "unirep-teacher-outputs/2"  # 2: the manifest is sealed and hashes every array
DTYPES = {"float16": np.float16, "float32": np.float32}  # config.OUTPUT_CACHE_DTYPES
MANIFEST = OUTPUT_CACHE_MANIFEST
_MIX = (1_000_003, 7_919, 2**62)


def draw_seed(seed: int, index: int, draw: int) -> int:
    """The RNG seed of sample ``index``'s augmentation draw ``draw`` (a fixed integer mix)."""
    a, b, m = _MIX
    return ((seed * a + index) * b + draw) % m


def needed_outputs(tasks: dict[str, Task]) -> dict[str, list[str]]:
    """``{task: keys}`` of the teacher outputs a distillation objective reads: ``"features"``
    (feature and contrastive terms) for every task, ``"pred"`` where the task has a prediction
    loss (:class:`unirep.objective.Objective`)."""
    return {
        name: ["features", *(["pred"] if task.prediction_loss is not None else [])]
        for name, task in tasks.items()
    }


class SeededDraws(Dataset):
    """``dataset[(index, draw)]``: sample ``index`` with its augmentation drawn from torch's
    global RNG seeded by :func:`draw_seed` (the RNG state outside is left as it was).

    With a ``store`` (an open :class:`OutputStore`), the sample also carries ``"teacher"``:
    ``{task: {key: float32 tensor}}`` of that draw, after checking that the sample's id and
    ``"aug"`` record are the ones the outputs were computed on.
    """

    def __init__(self, dataset: Dataset, seed: int, store: OutputStore | None = None) -> None:
        self.dataset = dataset
        self.seed = seed
        self.store = store

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """A whole batch. With a store and a dataset that replays recorded augmentations
        (``replay_items``: the Decathlon and dense readers), the stored draws are applied
        without touching the RNG, as one batch where the reader can, and the outputs are read
        with one gather per array; otherwise sample by sample (:meth:`__getitem__`)."""
        dataset = self.dataset
        if self.store is None or not getattr(
            dataset, "can_replay", hasattr(dataset, "replay_items")
        ):
            return [self[k] for k in keys]
        indices = [int(i) for i, _ in keys]
        draws = [int(d) for _, d in keys]
        samples = dataset.replay_items(indices, self.store.augs(indices, draws))  # type: ignore[attr-defined]
        self.store.check_ids(samples, indices)
        outputs = self.store.outputs_batch(indices, draws)
        return [
            {**sample, "teacher": {t: {k: v[j] for k, v in o.items()} for t, o in outputs.items()}}
            for j, sample in enumerate(samples)
        ]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, draw = (int(k) for k in key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed(self.seed, index, draw))
            sample = self.dataset[index]
        if self.store is not None:
            self.store.check(sample, index, draw)
            sample = {**sample, "teacher": self.store.outputs(index, draw)}
        return sample


def weights_identity(teacher: Any) -> str:
    """A teacher's weights hash: its manifest's ``weights_sha256``, else (an untrained teacher
    built in memory, e.g. the benchmark's) the sha256 of its state dict."""
    recorded = teacher.manifest.get("weights_sha256")
    if recorded:
        return str(recorded)
    digest = hashlib.sha256()
    for name, value in sorted(teacher.net.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_key(
    teachers: dict[str, str],
    data: dict[str, Any],
    draws: int,
    seed: int,
    outputs: dict[str, list[str]],
    dtype: str,
    autocast: str | None,
) -> str:
    """sha256 of everything that determines a stream's cached outputs.

    Args:
        teachers: ``{task: weights hash}`` of the stream's teachers (:func:`weights_identity`).
        data: the stream's data fingerprint, preprocessing and augmentation settings.
    """
    content = {
        "format": CACHE_FORMAT,
        "teachers": dict(sorted(teachers.items())),
        "data": data,
        "draws": draws,
        "seed": seed,
        "outputs": {t: sorted(k) for t, k in sorted(outputs.items())},
        "dtype": dtype,
        "autocast": autocast,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


class OutputStore:
    """A finished cache folder, memory-mapped read-only: ids ``[N]``, ``aug/<name>.npy``
    ``[N, K, ...]`` and ``<task>/<key>.npy`` ``[N, K, ...]``."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.manifest = read_json(self.folder / MANIFEST, what="teacher-output cache manifest")
        self.draws = int(self.manifest["draws"])
        self._arrays: dict[str, np.ndarray] | None = None  # opened lazily (DataLoader workers)

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {
                name: np.load(self.folder / f"{name}.npy", mmap_mode="r")
                for name in self.manifest["arrays"]
            }
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:  # memmaps are re-opened in each worker
        return {**self.__dict__, "_arrays": None}

    def check(self, sample: dict[str, Any], index: int, draw: int) -> None:
        """Refuse a sample that is not the one the outputs were computed on."""
        arrays = self._open()
        sid = int(torch.as_tensor(sample.get("id", -1)))
        if sid != int(arrays["ids"][index]):
            raise DataError(
                f"teacher-output cache {self.folder}: sample {index} has id {sid}, the cache "
                f"holds id {int(arrays['ids'][index])} (the training set changed order); delete "
                "the folder or set teachers.output_cache.draws=0"
            )
        for name, value in sample.get("aug", {}).items():
            stored = arrays.get(f"aug/{name}")
            if stored is not None and not np.array_equal(stored[index, draw], np.asarray(value)):
                raise DataError(
                    f"teacher-output cache {self.folder}: sample {index} draw {draw} was "
                    f"augmented differently ({name!r}) than when cached: the dataset's "
                    "augmentation does not draw from torch's RNG; set "
                    "teachers.output_cache.draws=0 for it"
                )

    def augs(self, indices: list[int], draws: list[int]) -> list[dict[str, Tensor]]:
        """The recorded ``aug`` of each ``(index, draw)``, as the dataset wrote it."""
        arrays = self._open()
        names = [a[len("aug/") :] for a in self.manifest["arrays"] if a.startswith("aug/")]
        columns = {n: arrays[f"aug/{n}"][indices, draws] for n in names}
        return [{n: torch.from_numpy(np.array(c[j])) for n, c in columns.items()}
                for j in range(len(indices))]  # fmt: skip

    def check_ids(self, samples: list[dict[str, Any]], indices: list[int]) -> None:
        """Refuse samples whose ids are not the cached ones (the training set changed order)."""
        stored = self._open()["ids"][indices]
        for sample, index, sid in zip(samples, indices, stored, strict=True):
            if int(torch.as_tensor(sample.get("id", -1))) != int(sid):
                self.check(sample, index, 0)  # raises, naming the sample and what to do

    def outputs_batch(self, indices: list[int], draws: list[int]) -> dict[str, dict[str, Tensor]]:
        """``{task: {key: float32 [B, ...]}}`` of the ``(index, draw)`` pairs, one gather each."""
        arrays = self._open()
        return {
            task: {
                k: torch.from_numpy(np.asarray(arrays[f"{task}/{k}"][indices, draws], np.float32))
                for k in keys
            }
            for task, keys in self.manifest["outputs"].items()
        }

    def outputs(self, index: int, draw: int) -> dict[str, dict[str, Tensor]]:
        """``{task: {key: float32 tensor}}`` of sample ``index``, draw ``draw``."""
        batch = self.outputs_batch([index], [draw])
        return {task: {k: v[0] for k, v in keys.items()} for task, keys in batch.items()}

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.rglob("*.npy"))


def _shard(n: int, rank: int, world: int) -> list[int]:
    return list(range(rank, n, world))


def build_store(
    folder: Path,
    accelerator: Any,
    dataset: Dataset,
    teachers: dict[str, nn.Module],
    tasks: dict[str, Task],
    outputs: dict[str, list[str]],
    draws: int,
    seed: int,
    dtype: str,
    batch_size: int,
    forward: Any,
    record: dict[str, Any],
) -> OutputStore:
    """Compute one stream's cache into ``<folder>.tmp`` and rename it into ``folder``.

    Every process computes the samples ``rank::world`` of every draw and writes them into the
    arrays the main process allocated; the main process then writes the manifest and renames the
    folder. ``forward(teachers, tasks, batch) -> {task: {key: tensor}}`` runs the teachers (the
    provider's :func:`~unirep.teachers.provider.teacher_outputs`, with the run's autocast).

    Raises:
        NonFiniteError: an output is not finite once stored in ``dtype`` (fp16 overflows at
            65504: use ``teachers.output_cache.dtype=float32``).
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    reader = SeededDraws(dataset, seed)
    n = len(reader)
    np_dtype = DTYPES[dtype]
    device = accelerator.device

    def run(keys: list[tuple[int, int]]) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
        raw = default_collate([reader[k] for k in keys])
        stream = tasks[next(iter(teachers))].stream
        batch = make_batch({stream: raw}, tasks).to(device)
        out = forward(teachers, tasks, batch)
        return raw, {t: {k: out[t][k].cpu() for k in ks} for t, ks in outputs.items()}

    raw, first = run([(0, 0)])  # shapes of every array
    shapes = _array_shapes(raw, first, n, draws, np_dtype)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a build killed before its rename
        for name, (shape, np_type) in shapes.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np_type, shape=shape)
    accelerator.wait_for_everyone()
    arrays = {name: np.load(tmp / f"{name}.npy", mmap_mode="r+") for name in shapes}
    mine = _shard(n, accelerator.process_index, accelerator.num_processes)
    for draw in range(draws):
        for start in range(0, len(mine), batch_size):
            indices = mine[start : start + batch_size]
            raw, out = run([(i, draw) for i in indices])
            _store_batch(arrays, raw, out, indices, draw, dtype)
    for array in arrays.values():
        array.flush()
    del arrays
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_sealed_json(
            tmp / MANIFEST,
            {
                "format": CACHE_FORMAT,
                "draws": draws,
                "samples": n,
                "dtype": dtype,
                "outputs": outputs,
                "arrays": list(shapes),
                "shapes": {name: list(shape) for name, (shape, _) in shapes.items()},
                "dtypes": {name: np.dtype(t).str for name, (_, t) in shapes.items()},
                "array_sha256": {name: file_sha256(tmp / f"{name}.npy") for name in shapes},
                **record,
            },
        )
        shutil.rmtree(folder, ignore_errors=True)  # a damaged one, refused by open_store
        tmp.replace(folder)  # complete: from now on only read
    accelerator.wait_for_everyone()
    return OutputStore(folder)


def _array_shapes(
    raw: dict[str, Any],
    first: dict[str, dict[str, Tensor]],
    n: int,
    draws: int,
    np_dtype: Any,
) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{array name: (shape, dtype)}`` of a stream's cache, from its first collated sample
    ``raw`` and the teachers' outputs on it ``first``: ids ``[N]``, each ``aug/<name>``
    ``[N, K, ...]`` in its own dtype, each ``<task>/<key>`` ``[N, K, ...]`` in ``np_dtype``."""
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {"ids": ((n,), np.int64)}
    for name, value in raw.get("aug", {}).items():
        value = np.asarray(value)
        shapes[f"aug/{name}"] = ((n, draws, *value.shape[1:]), value.dtype)
    for task, keys in first.items():
        for k, value in keys.items():
            shapes[f"{task}/{k}"] = ((n, draws, *value.shape[1:]), np_dtype)
    return shapes


def _store_batch(
    arrays: dict[str, np.ndarray],
    raw: dict[str, Any],
    out: dict[str, dict[str, Tensor]],
    indices: list[int],
    draw: int,
    dtype: str,
) -> None:
    """Write one batch of draw ``draw`` (samples ``indices``) into the cache's ``arrays``: its
    ids, its ``aug`` records and the teachers' outputs ``out`` in ``dtype``.

    Raises:
        NonFiniteError: an output is not finite once stored in ``dtype``.
    """
    np_dtype = DTYPES[dtype]
    arrays["ids"][indices] = torch.as_tensor(raw["id"]).numpy()
    for name, value in raw.get("aug", {}).items():
        arrays[f"aug/{name}"][indices, draw] = np.asarray(value)
    for task, keys in out.items():
        for k, value in keys.items():
            stored = value.float().numpy().astype(np_dtype)
            if not np.isfinite(stored).all():
                raise NonFiniteError(
                    f"teacher {task!r} output {k!r} is not finite once stored as "
                    f"{dtype} (sample {indices[0]}..., draw {draw}); set "
                    "teachers.output_cache.dtype=float32"
                )
            arrays[f"{task}/{k}"][indices, draw] = stored


def open_store(folder: Path, key: str) -> OutputStore | None:
    """The finished cache in ``folder`` when it holds ``key`` and every array matches what its
    manifest recorded (:func:`verify_store`); else None, for the caller to build it again (a
    damaged folder is said in one line; :func:`build_store` replaces it)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return None
    problem = verify_store(folder, key)
    if problem is None:
        return OutputStore(folder)
    _say(f"teacher-output cache {folder} is damaged ({problem}): it will be rebuilt")
    return None


def verify_store(folder: Path, key: str) -> str | None:
    """What is wrong with the cache folder ``folder`` (None: nothing): its sealed manifest is of
    this format and ``key``, and each array has the shape, dtype and sha256 recorded when built.
    Reads every array once."""
    folder = Path(folder)
    try:
        manifest = read_sealed_json(folder / MANIFEST)
    except ValueError as err:
        return str(err)
    if manifest.get("format") != CACHE_FORMAT:
        return f"format {manifest.get('format')!r}, this version reads {CACHE_FORMAT!r}"
    if manifest.get("key") != key:
        return "its manifest holds another key"
    try:
        arrays = list(manifest["arrays"])
        recorded = {n: (manifest["shapes"][n], manifest["dtypes"][n], manifest["array_sha256"][n])
                    for n in arrays}  # fmt: skip
    except (KeyError, TypeError) as err:
        return f"its manifest lacks {err}"
    for name, (shape, dtype, digest) in recorded.items():
        path = folder / f"{name}.npy"
        if not path.is_file():
            return f"{name}.npy is missing"
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:  # a truncated or malformed array
            return f"{name}.npy cannot be read ({err})"
        found = (list(array.shape), array.dtype.str)
        del array
        if found != (shape, dtype):
            return f"{name}.npy holds {found[1]} {found[0]}, its manifest says {dtype} {shape}"
        if file_sha256(path) != digest:
            return f"{name}.npy does not match the sha256 recorded when it was built"
    return None


def _say(line: str) -> None:
    """One line, from the first process of the machine only (every process verifies)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, flush=True)


_SPEED_ONLY_DATA = ("num_workers", "memory_cache_mib", "eval_batch_size", "batch_size",
                    "cache_dir", "on_corrupt", "root")  # fmt: skip
_AUGMENTATION = {
    "classification": ("domains", "hf_domains", "resize", "crop", "crops", "no_flip",
                       "square_resize"),
    "dense": ("scales", "flip", "augment", "inverse_depth", "label_dir"),
}  # fmt: skip
"""Each kind's settings that shape a training sample's augmentation."""


def stream_record(cfg: Config, data: RunData, stream: str, tasks: dict[str, Task]) -> dict:
    """What decides a stream's training samples: the files' fingerprint (per task, for partial
    labels), the preprocessing, and the data settings that shape augmentation."""
    settings = {k: v for k, v in to_dict(cfg.data).items() if k not in _SPEED_ONLY_DATA}
    section = to_dict(getattr(cfg, cfg.kind))
    settings[cfg.kind] = {k: section[k] for k in _AUGMENTATION[cfg.kind]}
    return {
        "fingerprints": {
            t: data.fingerprint(t) for t, task in tasks.items() if task.stream == stream
        },
        "preprocessing": data.preprocessing(stream),
        "settings": settings,
    }


def output_cache_summary(cfg: Config, record: dict[str, Any]) -> dict[str, Any]:
    """``metrics.json``'s ``summary.teacher_output_cache``: the cache's settings and size per
    stream, no timings (a resumed run writes the same)."""
    spec = cfg.teachers.output_cache
    return {
        "draws": spec.draws,
        "dtype": spec.dtype,
        "bytes_per_sample": {s: e["bytes_per_sample"] for s, e in record.items()},
    }
