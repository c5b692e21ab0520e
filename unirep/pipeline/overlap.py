"""The pruned auxiliary network's phases: learn the auxiliary task, prune it per task, then
learn the tasks jointly through their pruned networks.

Multi-task learning with partially overlapping label sets (the abstract in
``shared/seeds/abstracts.txt``, line 37; see :mod:`unirep.models.pruned_auxiliary` for the
network and the importance). A role (the student) whose network is
``classification.sharing.name=pruned_auxiliary`` trains:

1. ``<role>-auxiliary``: the backbone with one head over the union of the tasks' classes, on
   every task's training images pooled with their union labels
   (:class:`~unirep.data.carved.PooledStreams`; ``auxiliary_steps`` steps, selected on the
   pooled validation images), without distillation (no teacher covers the union);
2. each task's keep-mask over the hidden units, from its training images (no augmentation) on
   the auxiliary network, is written to ``unit_masks/<role>.json`` (read back on resume, so every
   process and every resumed run uses the same masks);
3. ``<role>``: the tasks learnt jointly, each through its masked network, initialised from the
   auxiliary network (the heads from the auxiliary head's rows of their classes), with the
   auxiliary loss kept as a joint term (:class:`AuxiliaryLoss`, ``auxiliary_weight``) and,
   for the student, distillation from the tasks' teachers as in any run.

The baseline is plain multi-task learning: the same backbone and heads, no auxiliary phase, no
masks, the same steps, data and schedule as the joint phase.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import unirep.layout as layout
from unirep.batch import Batch
from unirep.data.carved import AUXILIARY, PooledStreams, union_classes
from unirep.models.pruned_auxiliary import (
    keep_masks,
    layer_widths,
    mask_overlap,
    taylor_importance,
)
from unirep.objective import mixed_loss
from unirep.pipeline.rundir import stored


def learn_with_auxiliary(
    run: Any,
    trained: Any,
    role: str,
    teacher_val: Any,
    arch: dict[str, Any],
    fit_network: Callable[..., Any],
) -> Any:
    """Train ``role`` (see the module) with ``fit_network(run, trained, role, teacher_val, arch,
    name[, prepare])``; returns the role's last phase and records the auxiliary phase in
    ``trained.stages[role]``."""
    plain = plain_architecture(arch)
    if role != "student":  # the baseline: plain multi-task learning
        return fit_network(run, trained, role, teacher_val, plain, role)
    settings = dict(arch.get("sharing_kwargs") or {})
    union = union_classes(run.data)
    steps = settings.get("auxiliary_steps")
    auxiliary, result = fit_auxiliary(run, trained, role, plain, union, steps, fit_network)
    aux_net = auxiliary.module.student
    path = run.run_dir / layout.UNIT_MASKS / f"{role}.json"
    record = stored(
        path,
        run.accelerator,
        lambda: mask_record(
            aux_net, run.data, run.tasks, union, float(settings.get("keep", 0.5)),
            run.cfg.data.eval_batch_size,
        ),
        main_only=True,
        what="pruned auxiliary network's masks",
    )  # fmt: skip
    joint = joint_architecture(arch, run.data)

    def prepare(phase: Any) -> None:
        net = phase.module.student
        net.start_from(aux_net.backbone, aux_net.heads[AUXILIARY], record["masks"])
        attach_auxiliary_loss(phase, run.tasks, union)

    phase = fit_network(run, trained, role, teacher_val, joint, role, prepare)
    trained.stages[role] = [auxiliary_stage(auxiliary, result, record)]
    return phase


def attach_auxiliary_loss(phase: Any, tasks: dict[str, Any], union: dict[str, list[int]]) -> None:
    """Give the joint phase's objective the auxiliary loss (:class:`AuxiliaryLoss`) when its
    network keeps the auxiliary head; before ``fit`` prepares the module, so that it moves with
    it (also used by ``scripts/benchmark.py`` to time the joint step as it runs)."""
    net = phase.module.student
    if getattr(net, "auxiliary_head", None) is not None:
        streams = {t: task.stream for t, task in tasks.items()}
        term = AuxiliaryLoss(union, net.auxiliary_weight, streams)
        phase.module.objective.joint["auxiliary"] = term


def joint_architecture(arch: dict[str, Any], data: Any) -> dict[str, Any]:
    """The joint phase's network record: ``arch`` with the run's union of the tasks' classes."""
    if arch.get("sharing") != "pruned_auxiliary":
        return arch
    return {**arch, "sharing_kwargs": {**arch.get("sharing_kwargs", {}),
                                       "union": union_classes(data)}}  # fmt: skip


def plain_architecture(arch: dict[str, Any]) -> dict[str, Any]:
    """``arch`` without its sharing: one backbone, one head per task."""
    return {k: v for k, v in arch.items() if k not in ("sharing", "sharing_kwargs")}


def fit_auxiliary(
    run: Any,
    trained: Any,
    role: str,
    plain: dict[str, Any],
    union: dict[str, list[int]],
    steps: int | None,
    fit_network: Callable[..., Any],
) -> tuple[Any, Any]:
    """Train the auxiliary network, the phase ``<role>-auxiliary`` (see the module): ``run``
    with the pooled data, its one task and no distillation. Returns (phase, fit); the fit stays
    recorded as the role's earlier stage (its time counts in the role's)."""
    cfg = copy.deepcopy(run.cfg)
    if steps is not None:
        cfg.train.max_steps = int(steps)
    cfg.distill.enabled = False  # no teacher covers the union classes
    cfg.classification.selection_metric = "accuracy"  # nor gives Δm a reference
    pooled = PooledStreams(run.data, union)
    pooled_run = dataclasses.replace(run, cfg=cfg, data=pooled, tasks=pooled.tasks())
    phase = fit_network(pooled_run, trained, role, None, plain, f"{role}-auxiliary")
    return phase, trained.fits[role]


def mask_record(
    aux_net: nn.Module,
    data: Any,
    tasks: dict[str, Any],
    union: dict[str, list[int]],
    keep: float,
    batch_size: int,
) -> dict[str, Any]:
    """Each task's keep-mask on the auxiliary network (first-order Taylor importance over its
    training images without augmentation, restricted to its classes; the ``keep`` share of each
    layer's units): ``{"keep", "layers": {layer: width}, "union", "masks": {task: {layer: [0/1]}},
    "kept": {task: {layer: count}}, "importance": {task: {layer: [float]}}, "overlap": {task:
    {task: IoU}}}``."""
    backbone, head = aux_net.backbone, aux_net.heads[AUXILIARY]
    device = next(aux_net.parameters()).device
    train_sets = data.datasets("train")
    masks: dict[str, dict[str, list[int]]] = {}
    importance: dict[str, dict[str, list[float]]] = {}
    for name, task in tasks.items():
        loader = DataLoader(train_sets[task.stream], batch_size=batch_size, shuffle=False)
        batches = ((b["image"].to(device), b["label"].to(device)) for b in loader)
        scores = taylor_importance(backbone, head, batches, union[name])
        masks[name] = {n: [int(v) for v in m.tolist()] for n, m in keep_masks(scores, keep).items()}
        importance[name] = {n: [float(v) for v in s.tolist()] for n, s in scores.items()}
    return {
        "keep": keep,
        "layers": layer_widths(backbone, aux_net.feature_dim),
        "union": union,
        "masks": masks,
        "kept": {t: {n: sum(m) for n, m in per.items()} for t, per in masks.items()},
        "importance": importance,
        "overlap": mask_overlap(masks),
    }


def auxiliary_stage(auxiliary: Any, result: Any, record: dict[str, Any]) -> dict[str, Any]:
    """What ``metrics.json`` keeps of the auxiliary phase (``summary.sharing.stages``): its
    name, union classes, steps, validation selection and the units each task kept."""
    return {
        "phase": auxiliary.name,
        "union_classes": int(auxiliary.tasks[AUXILIARY].out_channels),
        "steps": result.steps,
        "best_step": result.best_step,
        "val_accuracy": result.best_val,
        "kept": record["kept"],
    }


class AuxiliaryLoss(nn.Module):
    """The auxiliary task's loss in the joint phase, a joint term of the objective:
    ``weight · mean_t CE(aux logits_t [B_t, U], union labels of y_t [B_t])`` over the tasks of
    the batch, each over its labelled (and, with mixup, mixed) samples. ``union``: ``{task:
    [union label of each task label]}``; ``streams``: ``{task: its stream}`` (mixup's key)."""

    def __init__(self, union: dict[str, list[int]], weight: float, streams: dict[str, str]) -> None:
        super().__init__()
        self.weight = float(weight)
        self.streams = dict(streams)
        self.ce = nn.CrossEntropyLoss()
        self.tasks = list(union)
        for i, labels in enumerate(union.values()):
            self.register_buffer(f"union_{i}", torch.tensor(labels), persistent=False)
        self.own_lr: list[tuple[list[nn.Parameter], float]] = []

    def forward(
        self, outputs: dict[str, dict[str, Tensor]], batch: Batch, step: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``({"auxiliary": weighted loss}, {"loss": unweighted})``."""
        losses = []
        for i, task in enumerate(self.tasks):
            out = outputs.get(task)
            if out is None or "auxiliary" not in out or task not in batch.targets:
                continue
            target = getattr(self, f"union_{i}")[batch.targets[task]]
            mix = batch.mix.get(self.streams.get(task, task))
            losses.append(
                mixed_loss(self.ce, out["auxiliary"], target, batch.label_mask[task], mix)
            )
        if not losses:
            zero = next(iter(outputs.values()))["pred"].sum() * 0.0
            return {"auxiliary": zero}, {"loss": zero.detach()}
        loss = torch.stack(losses).mean()
        return {"auxiliary": self.weight * loss}, {"loss": loss.detach()}
