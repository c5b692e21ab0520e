"""One batch type for every run: inputs per stream, targets and label masks per task.

The training stream yields ``{stream: collated samples}`` (one batch per stream and step);
:func:`make_batch` turns it into a :class:`Batch` for the run's tasks. Every sample of every
dataset carries ``"image"``, its targets, ``"id"`` (stable across epochs: the image's id in its
split) and ``"aug"`` (the augmentation parameters drawn for it), see :mod:`unirep.data`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unirep.tasks import Task


@dataclass
class Batch:
    """A training or evaluation batch.

    Attributes:
        inputs: ``{stream: images [B_s, 3, H, W]}``.
        targets: ``{task: target}`` (``[B_s]`` labels, ``[B_s, H, W]`` class maps,
            ``[B_s, C, H, W]`` regression maps), ``B_s`` of the task's stream.
        label_mask: ``{task: bool [B_s]}``, True where the sample is labelled for the task
            (all True unless the run uses partial labels).
        ids: ``{stream: int64 [B_s]}`` stable sample ids.
        aug: ``{stream: {name: tensor [B_s, ...]}}`` the augmentation drawn per sample
            (crop box, scale, flip); empty where a dataset does not record it.
        teacher: ``{task: {"features", "pred": tensor [B_s, ...]}}`` the teachers' outputs read
            from the teacher-output cache (:mod:`unirep.teachers.output_cache`), float32; empty when
            the teachers run online.
        mix: ``{stream: (perm int64 [B_s], λ)}`` when the stream's inputs were mixed
            (:func:`mix_batch`): sample ``i`` is ``λ·x_i + (1 − λ)·x_perm[i]``; empty: unmixed.
    """

    inputs: dict[str, Tensor]
    targets: dict[str, Tensor]
    label_mask: dict[str, Tensor]
    ids: dict[str, Tensor] = field(default_factory=dict)
    aug: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    teacher: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    mix: dict[str, tuple[Tensor, float]] = field(default_factory=dict)

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device`` (non-blocking copies)."""

        def move(x: Tensor) -> Tensor:
            return x.to(device, non_blocking=True)

        return Batch(
            inputs={s: move(x) for s, x in self.inputs.items()},
            targets={t: move(x) for t, x in self.targets.items()},
            label_mask={t: move(x) for t, x in self.label_mask.items()},
            ids={s: move(x) for s, x in self.ids.items()},
            aug={s: {k: move(v) for k, v in a.items()} for s, a in self.aug.items()},
            teacher={t: {k: move(v) for k, v in o.items()} for t, o in self.teacher.items()},
            mix={s: (move(perm), lam) for s, (perm, lam) in self.mix.items()},
        )


def sample_ids(samples: dict[str, Any]) -> Tensor:
    """int64 ``[B]`` stable ids of collated samples (``id``; samples of other readers:
    ``image_id`` or ``index``; -1 where a dataset has none)."""
    for key in ("id", "image_id", "index"):
        if key in samples:
            return torch.as_tensor(samples[key], dtype=torch.int64)
    return torch.full((samples["image"].shape[0],), -1, dtype=torch.int64)


def make_batch(raw: dict[str, dict[str, Any]], tasks: dict[str, Task]) -> Batch:
    """Build a :class:`Batch` from ``{stream: collated samples}`` for the tasks whose stream
    is present. A sample's ``"label_mask"`` entry (``{task: bool}``), when a dataset provides
    one, marks partial labels; otherwise every sample is labelled for every task."""
    inputs = {s: b["image"] for s, b in raw.items()}
    targets: dict[str, Tensor] = {}
    mask: dict[str, Tensor] = {}
    for name, task in tasks.items():
        if task.stream not in raw:
            continue
        sample = raw[task.stream]
        n = inputs[task.stream].shape[0]
        if task.target_key in sample:
            targets[name] = sample[task.target_key]
        given = sample.get("label_mask", {})
        if name in given:
            mask[name] = torch.as_tensor(given[name], dtype=torch.bool)
        else:
            mask[name] = torch.ones(n, dtype=torch.bool)
    ids = {s: sample_ids(b) for s, b in raw.items()}
    aug = {s: dict(b["aug"]) for s, b in raw.items() if isinstance(b.get("aug"), dict)}
    teacher = {
        name: dict(raw[task.stream]["teacher"][name])
        for name, task in tasks.items()
        if task.stream in raw and name in raw[task.stream].get("teacher", {})
    }
    return Batch(inputs=inputs, targets=targets, label_mask=mask, ids=ids, aug=aug,
                 teacher=teacher)  # fmt: skip


def mix_batch(batch: Batch, alpha: float, draw: Sequence[int]) -> Batch:
    """Mixup (Zhang et al., ICLR 2018) within each stream: ``x_i ← λ·x_i + (1 − λ)·x_perm[i]``
    with one ``λ ~ Beta(α, α)`` and one permutation per stream, recorded in :attr:`Batch.mix` so
    that the task loss mixes the labels the same way (:func:`unirep.objective.mixed_loss`).

    The draw is a pure function of ``draw`` (e.g. seed, step, micro-batch, process), never of a
    global random state, so a resumed run mixes the same pairs. The teachers run on the mixed
    images, which makes distillation *consistent* (Beyer et al., "Knowledge distillation: A good
    teacher is patient and consistent", CVPR 2022): the soft targets are the teachers' on the
    very images the student sees. Inputs ``[B_s, 3, H, W]``; a stream of one sample is unmixed.
    """
    rng = np.random.default_rng([int(v) for v in draw])
    inputs, mix = dict(batch.inputs), {}
    for stream in sorted(batch.inputs):
        x = batch.inputs[stream]
        if x.shape[0] < 2:
            continue
        lam = float(rng.beta(alpha, alpha))
        perm = torch.as_tensor(rng.permutation(x.shape[0]), dtype=torch.int64, device=x.device)
        inputs[stream] = lam * x + (1.0 - lam) * x[perm]
        mix[stream] = (perm, lam)
    return replace(batch, inputs=inputs, mix=mix)
