"""Progressive decoder fusion's stages (PDF; Gurulingan, Arani & Zonooz, CoLLAs 2022).

A role (the baseline or the student) whose network is ``dense.sharing.name=pdf`` trains stage
after stage, in one command:

1. stage 0: every decoder block separate (:class:`~unirep.models.fusion.ProgressiveDecoderNet`
   with ``fusion=[]``), trained and selected on validation like any phase
   (``checkpoints/<role>-stage0/``, ``logs/<role>-stage0.csv``);
2. the stage's selected network reads the validation images (at most ``images``); each task's
   map after the next block is mean-pooled over space and the tasks are compared pairwise by
   debiased linear CKA (:func:`~unirep.models.fusion.similarity_matrix`), then grouped
   (:func:`~unirep.models.fusion.group_within`: inside the groups of the block before; where
   no grouping reaches the threshold, the reference's fallback fuses the closest tasks anyway,
   ``fallback="separate"`` keeps them apart). The
   similarities and the groups are written to ``fusion/<role>-stage<k>.json`` (read back on
   resume, never measured again);
3. if a group holds two or more tasks, the next stage fuses that block and trains from the
   start (same seed, same data order), else the stage just trained is the role's network.
   Fusion stops after ``max_blocks`` fused blocks or at the decoder's last block.

Every stage is a phase of its own, so a run killed anywhere resumes where it stopped; the last
stage is evaluated, exported and reported as the role.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import unirep.layout as layout
from unirep.models.fusion import group_within, similarity_matrix
from unirep.pipeline.rundir import stored


def stage_name(role: str, stage: int) -> str:
    """The phase name (checkpoint folder, log) of ``role``'s fusion stage ``stage``."""
    return f"{role}-stage{stage}"


def fuse_progressively(
    run: Any,
    trained: Any,
    role: str,
    teacher_val: Any,
    arch: dict[str, Any],
    fit_network: Callable[..., Any],
) -> Any:
    """Train ``role``'s stages (see the module) with ``fit_network(run, trained, role,
    teacher_val, arch, name)`` (:func:`unirep.pipeline.stage_two.fit_network`); returns the
    last stage's phase and records every stage's grouping in ``trained.stages[role]``."""
    fusion: list[list[list[str]]] = list(arch.get("sharing_kwargs", {}).get("fusion") or [])
    records: list[dict[str, Any]] = []
    stage = 0
    while True:
        kwargs = {**arch.get("sharing_kwargs", {}), "fusion": [list(p) for p in fusion]}
        stage_arch = {**arch, "sharing_kwargs": kwargs}
        name = stage_name(role, stage)
        phase = fit_network(run, trained, role, teacher_val, stage_arch, name)
        net = phase.module.student
        block = net.next_block()
        if block is None:
            break
        path = run.run_dir / layout.FUSION / f"{name}.json"
        record = stored(path, run.accelerator, lambda n=net, b=block: measure_grouping(run, n, b))
        records.append(record)
        if all(len(group) == 1 for group in record["groups"]):
            break  # no two tasks are alike at this block: nothing more to fuse
        fusion.append(record["groups"])
        stage += 1
    trained.stages[role] = records
    return phase


@torch.no_grad()
def pooled_block_features(run: Any, net: Any, block: int) -> dict[str, torch.Tensor]:
    """``{task: [n, D]}``: each task's map after ``block``, mean-pooled over space, for the
    first ``net.images`` validation images (gathered over the processes, in split order)."""
    stream = run.data.streams()[0]
    dataset = run.data.datasets("val")[stream]
    was_training = net.training
    net.eval()
    parts: dict[str, list[torch.Tensor]] = {t: [] for t in net.tasks}
    for batch in run.evaluator.loader("val", stream, dataset):
        maps = net.block_features(batch["image"], block)
        pooled = run.accelerator.gather_for_metrics(
            {t: m.float().mean((2, 3)) for t, m in maps.items()}
        )
        for task, feats in pooled.items():
            parts[task].append(feats.cpu())
    net.train(was_training)
    return {t: torch.cat(p)[: net.images] for t, p in parts.items()}


def measure_grouping(run: Any, net: Any, block: int) -> dict[str, Any]:
    """The record of one fusion decision: the block, the images read, the CKA of every pair of
    tasks there, the threshold and the groups chosen (inside the previous block's groups)."""
    features = pooled_block_features(run, net, block)
    sim = similarity_matrix(features)
    parents = net.fusion[-1] if net.fusion else [list(net.tasks)]
    groups, cleared = group_within(parents, sim, net.min_similarity, net.fallback)
    return {
        "block": block,
        "images": int(next(iter(features.values())).shape[0]),
        "similarity": sim,
        "min_similarity": net.min_similarity,
        "cleared": cleared,
        "fallback": net.fallback,
        "groups": groups,
    }
