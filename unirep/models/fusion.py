"""Progressive decoder fusion (PDF; Gurulingan, Arani & Zonooz, CoLLAs 2022, arXiv 2208.09427).

The dense student's per-task decoders are cut into *blocks*; PDF fuses, block by block from the
encoder side, the blocks of the tasks whose representations there are similar: tasks of one
group share the block (one computation), and the groups of a block only split further at later
blocks. Which tasks are grouped is measured, not chosen: train with the blocks separate, measure
the pairwise debiased linear CKA (Kornblith et al., ICML 2019) between the task decoders'
spatially mean-pooled features at the next block on validation images, group the tasks with the
reference's rule (:func:`group_tasks`), fuse that block and retrain
(:mod:`unirep.pipeline.progressive` runs the stages).

:class:`ProgressiveDecoderNet` is the network of one stage: the shared encoder of
:class:`~unirep.models.dense.DenseMultiTaskNet`, its :class:`~unirep.models.dense.PyramidDecoder`
cut into blocks, and a head per task. With ``fusion=[]`` it computes what the shared-encoder
student computes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.models.dense import DenseMultiTaskNet
from unirep.models.segnet import conv_bn_relu

Partition = list[list[str]]
"""Groups of task names: every task in exactly one group."""


def check_pdf_arguments(
    fusion: Sequence[Sequence[Sequence[str]]] | None = None,
    min_similarity: float = 0.95,
    max_blocks: int | None = None,
    images: int = 800,
    fallback: str = "reference",
) -> None:
    """Raise ``ValueError`` naming the argument for a PDF setting that cannot be used."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    if not -1.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity (a CKA) must be in [-1, 1], got {min_similarity}")
    if max_blocks is not None and max_blocks < 0:
        raise ValueError(f"max_blocks must be >= 0 (or null: every block), got {max_blocks}")
    if images < 4:
        raise ValueError(f"images (validation images for CKA) must be >= 4, got {images}")


def _key(group: Iterable[str]) -> str:
    return "+".join(group)


class ProgressiveDecoderNet(DenseMultiTaskNet):
    """A shared encoder, per-task decoders whose first blocks are fused per group, heads.

    The decoder of a task (:class:`~unirep.models.dense.PyramidDecoder`) is cut into
    ``S + 1`` blocks for an encoder of ``S`` stages, in the order the features flow: block
    ``j < S`` is the 1×1 lateral conv of stage ``S − 1 − j`` added to the running map (upsampled
    bilinearly to that stage's size; block 0 starts it from the last stage), block ``S`` the 3×3
    conv–BN–ReLU that ends it. ``fusion[j]`` partitions the tasks at block ``j``: each group shares
    one block, reading the output of its tasks' common block ``j − 1`` (so each group of block
    ``j`` lies inside one group of block ``j − 1``); blocks past ``len(fusion)`` are per task.

    Args:
        encoder: a factory of the encoder (see :data:`~unirep.models.dense.DENSE_ENCODERS`).
        tasks: ``{task: output channels}``.
        decoder_channels: width ``D`` of every block and head.
        unit_vector: tasks whose prediction is L2-normalised per pixel (normals).
        fusion: the partition of the tasks at each fused block, e.g.
            ``[[["semantic", "normal"], ["depth"]]]`` fuses block 0 of segmentation and normals.
        min_similarity, max_blocks, images, fallback: the procedure's settings
            (:mod:`unirep.pipeline.progressive`): the reference's grouping threshold (0.95 in
            its ``sep_de_group.yaml``), the most blocks to fuse (None: all), how many
            validation images the CKA reads (800 in the reference) and what the grouping does
            when no partition reaches the threshold (:data:`FALLBACKS`).

    Forward: as :class:`~unirep.models.dense.DenseMultiTaskNet`. :meth:`block_features` gives
    every task's representation after one block.
    """

    def __init__(
        self,
        encoder: Callable[[], nn.Module],
        tasks: dict[str, int],
        decoder_channels: int = 64,
        unit_vector: Iterable[str] = (),
        fusion: Sequence[Sequence[Sequence[str]]] | None = None,
        min_similarity: float = 0.95,
        max_blocks: int | None = None,
        images: int = 800,
        fallback: str = "reference",
    ) -> None:
        check_pdf_arguments(fusion, min_similarity, max_blocks, images, fallback)
        super().__init__(encoder(), tasks, decoder_channels, unit_vector=unit_vector)
        del self.decoders  # replaced by the blocks below
        names = list(tasks)
        channels = list(self.encoder.channels)
        self.num_blocks = len(channels) + 1
        self.fusion: list[Partition] = [[list(g) for g in part] for part in fusion or []]
        self.partitions = check_fusion(self.fusion, names, self.num_blocks)
        self.min_similarity = float(min_similarity)
        self.max_blocks = max_blocks
        self.images = int(images)
        self.fallback = fallback
        blocks = []
        for j, partition in enumerate(self.partitions):
            if j < len(channels):
                make: Callable[[], nn.Module] = lambda c=channels[-1 - j]: nn.Conv2d(  # noqa: E731
                    c, decoder_channels, kernel_size=1
                )
            else:
                make = lambda: conv_bn_relu(decoder_channels, decoder_channels)  # noqa: E731
            blocks.append(nn.ModuleDict({_key(g): make() for g in partition}))
        self.blocks = nn.ModuleList(blocks)

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    def _decode(self, stages: list[Tensor], upto: int | None = None) -> dict[str, Tensor]:
        """``{task: its map after block upto (default: the last)}``, each group's block run
        once on its parent's map."""
        last = self.num_blocks - 1 if upto is None else upto
        maps: dict[str, Tensor] = {}  # group key -> map after the current block
        owner: dict[str, str] = {}  # task -> key of its group at the previous block
        s = len(stages)
        for j in range(last + 1):
            new: dict[str, Tensor] = {}
            for group in self.partitions[j]:
                key = _key(group)
                block = self.blocks[j][key]
                if j == 0:
                    x = block(stages[-1])
                elif j < s:
                    prev = maps[owner[group[0]]]
                    feat = stages[s - 1 - j]
                    up = F.interpolate(
                        prev, size=feat.shape[-2:], mode="bilinear", align_corners=False
                    )
                    x = up + block(feat)
                else:
                    x = block(maps[owner[group[0]]])
                new[key] = x
            maps = new
            owner = {t: _key(g) for g in self.partitions[j] for t in g}
        return {t: maps[owner[t]] for t in self.tasks}

    def forward(self, inputs: dict[str, Tensor] | Tensor) -> dict[str, dict[str, Tensor]]:
        images = self.images_of(inputs)
        shared = self.encoder(images)
        feats = self._decode(shared)
        return {
            task: {
                "pred": self.predict(task, feats[task], images.shape[-2:]),
                "features": feats[task],
                "bottleneck": shared[-1],
            }
            for task in self.tasks
        }

    def block_features(self, images: Tensor, block: int) -> dict[str, Tensor]:
        """``{task: [B, D, h_j, w_j]}``: each task's map after block ``block`` (what PDF
        compares to decide whether to fuse that block)."""
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block must be in [0, {self.num_blocks}), got {block}")
        return self._decode(self.encoder(images), upto=block)

    def next_block(self) -> int | None:
        """The block the next stage would fuse (None: every block is fused or past
        ``max_blocks``, or the last fusion left every task on its own)."""
        j = len(self.fusion)
        limit = (
            self.num_blocks if self.max_blocks is None else min(self.max_blocks, self.num_blocks)
        )
        if j >= limit:
            return None
        if self.fusion and all(len(g) == 1 for g in self.fusion[-1]):
            return None
        return j

    def sharing_record(self) -> dict[str, Any]:
        """What ``metrics.json`` says of the sharing: the fused partition at each block."""
        return {
            "name": "pdf",
            "blocks": self.num_blocks,
            "fusion": [[list(g) for g in part] for part in self.fusion],
        }


def check_fusion(fusion: list[Partition], tasks: list[str], blocks: int) -> list[Partition]:
    """The partition of every block (``fusion`` then one group per task); ``ValueError`` when a
    fused block does not partition the tasks or splits from a group it does not lie in."""
    if len(fusion) > blocks:
        raise ValueError(f"fusion names {len(fusion)} blocks, the decoder has {blocks}")
    parts: list[Partition] = []
    for j, partition in enumerate(fusion):
        flat = [t for g in partition for t in g]
        if sorted(flat) != sorted(tasks) or any(not g for g in partition):
            raise ValueError(
                f"fusion[{j}] must put every task ({', '.join(tasks)}) in exactly one group, "
                f"got {partition}"
            )
        if parts:
            parent = {t: i for i, g in enumerate(parts[-1]) for t in g}
            split = [g for g in partition if len({parent[t] for t in g}) > 1]
            if split:
                raise ValueError(
                    f"fusion[{j}] groups {split} were not one group at block {j - 1}: a fused "
                    "block reads one map"
                )
        parts.append([list(g) for g in partition])
    singles = [[t] for t in tasks]
    return parts + [singles] * (blocks - len(parts))


# --------------------------------------------------------------------------------------------
# Similarity and grouping


def linear_cka_debiased(x: Tensor, y: Tensor) -> Tensor:
    """Debiased linear CKA between features ``x`` ``[n, p]`` and ``y`` ``[n, q]`` (``n >= 4``)
    in feature space (Kornblith, Norouzi, Lee & Hinton, ICML 2019, and their notebook's
    ``feature_space_linear_cka(..., debiased=True)``; what PDF uses). In float64."""
    n = x.shape[0]
    if n < 4 or y.shape[0] != n:
        raise ValueError(f"debiased CKA needs n >= 4 paired rows, got {x.shape} and {y.shape}")
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)

    def debiased(xty: Tensor, rows_x: Tensor, rows_y: Tensor, sx: Tensor, sy: Tensor) -> Tensor:
        return xty - n / (n - 2.0) * rows_x.dot(rows_y) + sx * sy / ((n - 1) * (n - 2))

    rows_x, rows_y = (x * x).sum(1), (y * y).sum(1)
    sx, sy = rows_x.sum(), rows_y.sum()
    hsic = debiased(torch.linalg.norm(x.T @ y) ** 2, rows_x, rows_y, sx, sy)
    norm_x = debiased(torch.linalg.norm(x.T @ x) ** 2, rows_x, rows_x, sx, sx).clamp_min(0).sqrt()
    norm_y = debiased(torch.linalg.norm(y.T @ y) ** 2, rows_y, rows_y, sy, sy).clamp_min(0).sqrt()
    denominator = norm_x * norm_y
    if denominator <= 0:  # a constant representation: no similarity to measure
        return torch.zeros((), dtype=torch.float64)
    return hsic / denominator


def similarity_matrix(features: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """``{a: {b: CKA(a, b)}}`` of pooled features ``{task: [n, C]}`` (1 on the diagonal)."""
    names = list(features)
    sim = {a: {b: 1.0 for b in names} for a in names}
    for a, b in itertools.combinations(names, 2):
        value = float(linear_cka_debiased(features[a], features[b]))
        sim[a][b] = sim[b][a] = value
    return sim


def _partitions(items: list[str]) -> Iterator[Partition]:
    """Every set partition of ``items`` (Bell(n) of them), each group in ``items`` order."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for smaller in _partitions(rest):
        yield [[first], *smaller]
        for i in range(len(smaller)):
            yield [*smaller[:i], [first, *smaller[i]], *smaller[i + 1 :]]


def partition_score(partition: Partition, sim: dict[str, dict[str, float]]) -> float:
    """The mean over tasks of each task's mean similarity to its group-mates (0 alone)."""
    scores = []
    for group in partition:
        for t in group:
            mates = [sim[t][u] for u in group if u != t]
            scores.append(sum(mates) / len(mates) if mates else 0.0)
    return sum(scores) / len(scores)


FALLBACKS = ("reference", "separate")
"""What :func:`group_tasks` returns when no partition into fewer groups than tasks reaches the
threshold: the reference code's best partition into at most ``T − 1`` groups, or every task
alone."""


def group_tasks(
    sim: dict[str, dict[str, float]], min_similarity: float, fallback: str = "reference"
) -> tuple[Partition, bool]:
    """PDF's grouping (``GroupTasks.create_selection`` of the reference code): the partition of
    the tasks into the fewest groups whose score (:func:`partition_score`) reaches
    ``min_similarity``, the best-scoring one among those with that many groups; returns it and
    whether it reached the threshold.

    Where none with fewer groups than tasks reaches it, the reference returns its
    best-scoring partition into at most ``T − 1`` groups (``fallback="reference"``; so two
    tasks are always fused, and some tasks are always fused: a singleton scores 0, so with three
    tasks a pair's partition scores at most ⅔ of its CKA and 0.95 is out of its reach); with
    ``fallback="separate"`` every task keeps its own block. Groups keep the order of ``sim``'s
    tasks."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    tasks = list(sim)
    if len(tasks) < 2:
        return [list(tasks)], True
    order = {t: i for i, t in enumerate(tasks)}
    best: dict[int, tuple[float, Partition]] = {}
    for partition in _partitions(tasks):
        k = len(partition)
        score = partition_score(partition, sim)
        if k not in best or score > best[k][0]:
            best[k] = (score, partition)

    def ordered(partition: Partition) -> Partition:
        groups = [sorted(g, key=order.__getitem__) for g in partition]
        return sorted(groups, key=lambda g: order[g[0]])

    for k in range(1, len(tasks)):
        if best[k][0] >= min_similarity:
            return ordered(best[k][1]), True
    if fallback == "reference":  # the best-scoring partition into at most T - 1 groups
        score, partition = max((best[k] for k in range(1, len(tasks))), key=lambda b: b[0])
        return ordered(partition), False
    return [[t] for t in tasks], False


def group_within(
    parents: Partition,
    sim: dict[str, dict[str, float]],
    min_similarity: float,
    fallback: str = "reference",
) -> tuple[Partition, bool]:
    """:func:`group_tasks` inside each group of the previous block (a fused block reads one
    map, so only tasks that share every earlier block can share the next); returns the groups
    and whether every parent's grouping reached the threshold."""
    out: Partition = []
    cleared = True
    for parent in parents:
        sub = {a: {b: sim[a][b] for b in parent} for a in parent}
        groups, ok = group_tasks(sub, min_similarity, fallback)
        out += groups
        cleared = cleared and ok
    return out, cleared
