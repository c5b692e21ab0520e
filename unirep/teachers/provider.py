"""The frozen teachers' outputs for a training phase, from one call: ``provider(batch)``.

Three sources stand behind a :class:`TeacherOutputs`, chosen by the config's ``teachers``
section, and the training loop knows none of them:

- **online**: each teacher runs on its task's stream at every step;
- **batched** (``teachers.batched``): teachers of one architecture and input shape run as one
  vmapped call over their stacked weights (:mod:`unirep.teachers.batched`; the same outputs);
- **cached** (``teachers.output_cache.draws``): the outputs were computed once on pre-drawn
  augmentations (:mod:`unirep.teachers.output_cache`) and ride in the batch
  (:attr:`unirep.batch.Batch.teacher`); no teacher runs.

:func:`provide_teachers` builds the provider of a phase, and with the cache on also the training
sets that read the stored draws; :func:`teacher_outputs` is the forward the other two share.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from unirep.batch import Batch
from unirep.config.schema import Config
from unirep.data.streams import RunData
from unirep.tasks import Task
from unirep.teachers.batched import BatchedTeachers, each_teacher, teacher_autocast_dtype
from unirep.teachers.output_cache import (
    SeededDraws,
    build_store,
    cache_key,
    needed_outputs,
    open_store,
    stream_record,
    weights_identity,
)
from unirep.teachers.store import Teacher, teacher_root

Outputs = dict[str, dict[str, Tensor]]  # {task: {"pred", "features", ...}}


def teacher_outputs(
    teachers: dict[str, nn.Module],
    tasks: dict[str, Task],
    batch: Batch,
    autocast: AbstractContextManager[Any] | None = None,
    batched: BatchedTeachers | None = None,
) -> Outputs:
    """``{task: outputs}`` of each frozen teacher on its task's stream, in float32.

    The teachers run under ``torch.inference_mode`` (no autograd record, no version counters) and
    ``autocast`` (none: full precision); ``batched`` evaluates teachers of one architecture as
    one call (``teachers.batched``; the same outputs). The outputs leave inference mode as
    ordinary float32 copies: a loss may save them for its backward, which inference tensors
    cannot be.
    """
    with torch.inference_mode(), autocast or nullcontext():
        if batched is not None:
            out = batched(batch.inputs)
        else:
            out = each_teacher(teachers, tasks, batch.inputs)
    return {t: {k: v.to(torch.float32, copy=True) for k, v in o.items()} for t, o in out.items()}


@dataclass
class TeacherOutputs:
    """The teachers' outputs of a phase: ``provider(batch) -> {task: {"pred", "features"}}``.

    Attributes:
        teachers: ``{task: frozen network}`` (empty when the outputs are cached).
        tasks: the phase's tasks.
        autocast: ``teachers.autocast`` (``bf16``, ``fp16``; None: the run's mixed precision).
        batched: ``teachers.batched``: teachers of one architecture as one call.
        cached: the outputs ride in every batch (the teacher-output cache): no teacher runs.
    """

    teachers: dict[str, nn.Module]
    tasks: dict[str, Task]
    autocast: str | None = None
    batched: bool = False
    cached: bool = False
    _accelerator: Any = field(default=None, repr=False)
    _dtype: torch.dtype | None = field(default=None, repr=False)
    _batched: BatchedTeachers | None = field(default=None, repr=False)

    def prepare(
        self, accelerator: Any, memory_format: torch.memory_format = torch.preserve_format
    ) -> TeacherOutputs:
        """Move the teachers to the accelerator's device (in ``memory_format``), resolve the
        autocast dtype and stack the batched groups; returns ``self``."""
        self._accelerator = accelerator
        self.teachers = {
            t: net.to(accelerator.device, memory_format=memory_format)
            for t, net in self.teachers.items()
        }
        self._dtype = teacher_autocast_dtype(self.autocast, accelerator.device)
        if self.batched and self.teachers:
            self._batched = BatchedTeachers(self.teachers, self.tasks)
        return self

    def context(self) -> AbstractContextManager[Any]:
        """The teachers' autocast: ``teachers.autocast``'s dtype, else the run's mixed
        precision (accelerate's)."""
        acc = self._accelerator
        if acc is None:
            return nullcontext()
        if self._dtype is None:
            return acc.autocast()
        return torch.autocast(acc.device.type, dtype=self._dtype)

    def __call__(self, batch: Batch) -> Outputs | None:
        """The outputs for ``batch`` (None when there are no teachers)."""
        if self.cached:
            return batch.teacher or None
        if not self.teachers:
            return None
        return teacher_outputs(self.teachers, self.tasks, batch, self.context(), self._batched)

    def __bool__(self) -> bool:
        return self.cached or bool(self.teachers)


@dataclass
class Provision:
    """What :func:`provide_teachers` gives a phase: the provider, the training sets (reading the
    cache's draws when it is on), the number of draws (0: no cache) and the cache's record."""

    outputs: TeacherOutputs
    train_sets: dict[str, Dataset]
    draws: int = 0
    cache: dict[str, Any] = field(default_factory=dict)


def provide_teachers(
    cfg: Config,
    accelerator: Any,
    data: RunData,
    teachers: dict[str, Teacher],
    tasks: dict[str, Task],
    train_sets: dict[str, Dataset],
    seed: int,
    name: str = "student",
) -> Provision:
    """The teachers' outputs for a phase that distils ``teachers`` (``{}``: none, the baseline).

    With ``teachers.output_cache.draws`` > 0 the outputs are read from the cache, built now for
    the streams that lack one (its record per stream: folder, whether built now, seconds, bytes
    per sample); otherwise the teachers run at every step, batched or one by one.
    """
    nets = {t: teacher.net for t, teacher in teachers.items()}
    spec = cfg.teachers
    online = TeacherOutputs(nets, tasks, spec.autocast, spec.batched)
    if not spec.output_cache.draws or not nets:
        return Provision(online, train_sets)
    sets, record = _cached_sets(cfg, accelerator, data, teachers, tasks, train_sets, seed, name)
    cached = TeacherOutputs({}, tasks, spec.autocast, cached=True)
    return Provision(cached, sets, spec.output_cache.draws, record)


def _cached_sets(
    cfg: Config,
    accelerator: Any,
    data: RunData,
    teachers: dict[str, Teacher],
    tasks: dict[str, Task],
    train_sets: dict[str, Dataset],
    seed: int,
    name: str,
) -> tuple[dict[str, Dataset], dict[str, Any]]:
    """Each stream's training set read through the stored draws (the store built when missing),
    and the cache's record per stream."""
    spec = cfg.teachers.output_cache
    outputs = needed_outputs(tasks)
    root = teacher_root(cfg) / "outputs"
    device = accelerator.device
    forward_outputs = TeacherOutputs({}, tasks, cfg.teachers.autocast).prepare(accelerator)

    def forward(nets: dict[str, nn.Module], tasks: dict[str, Task], batch: Any) -> Outputs:
        return teacher_outputs(nets, tasks, batch, forward_outputs.context())

    sets, record = {}, {}
    for stream, dataset in train_sets.items():
        mine = {t: teacher for t, teacher in teachers.items() if tasks[t].stream == stream}
        if not mine:
            sets[stream] = dataset
            continue
        wanted = {t: outputs[t] for t in mine}
        key = cache_key(
            {t: weights_identity(teacher) for t, teacher in mine.items()},
            stream_record(cfg, data, stream, tasks),
            spec.draws, seed, wanted, spec.dtype, cfg.teachers.autocast,
        )  # fmt: skip
        t0 = time.perf_counter()
        folder = root / f"{stream}-{key[:12]}"
        store = open_store(folder, key)
        built = store is None
        if store is None:
            nets = {t: teacher.net.to(device) for t, teacher in mine.items()}
            store = build_store(
                folder, accelerator, dataset, nets, tasks, wanted, spec.draws, seed,
                spec.dtype, cfg.data.eval_batch_size, forward, {"key": key, "stream": stream},
            )  # fmt: skip
        sets[stream] = SeededDraws(dataset, seed, store)
        size = store.disk_bytes()
        entry = record[stream] = {
            "folder": str(store.folder),
            "built": built,
            "seconds": time.perf_counter() - t0,
            "bytes_per_sample": size / max(1, store.manifest["samples"]),
            "bytes": size,
        }
        accelerator.print(
            f"[{name}] teacher outputs of {stream!r}: {'built' if built else 'found'} in "
            f"{entry['folder']} ({entry['bytes_per_sample'] / 1024:.1f} KiB per sample, "
            f"{entry['seconds']:.1f} s)"
        )
    return sets, record
