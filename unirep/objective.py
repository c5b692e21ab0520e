"""The objective: per-task supervised losses and distillation terms, returned as a LossBundle.

Universal Representations (Li, Liu & Bilen, IJCV 2023, Eq. 3), for each task ``t`` (a Visual
Decathlon domain, or a dense task) with frozen teacher ``φ_t``::

    L_t = w_t·ℓ_t(ŷ_t, y_t)  +  a(s)·σ·λ_f,t·Σ_k ℓ_f(A_t^k(student), φ_t(x))
                             +  a(s)·β·λ_p,t·ℓ_p,t(ŷ_t, φ_t's prediction)

``A_t^k`` are the task's alignment adapters (one on the pooled feature for classification; two
for dense tasks: the bottleneck and the last decoder feature, URL's NYUv2 setting), ``ℓ_f`` the
feature-distillation loss, ``ℓ_p,t`` the task's prediction-distillation loss (None: off) and
``a(s)`` the annealing factor (URL: linear from 1 to 0 over training). The objective does not add
these up: it returns them per task in a :class:`~unirep.losses.bundle.LossBundle`, and the phase's
weighting (:mod:`unirep.weighting`) turns them into the update.

With ``distill.contrastive_weight`` the distillation of each task also has a CRD-style in-batch
contrastive term (Tian, Krishnan & Isola, ICLR 2020): InfoNCE of each adapted student feature
against the teachers' features of the batch, gathered across processes.

Joint terms belong to no single task: MTPSL or JTR for partial labels (:class:`JointTerm`), the
cross-task consistency, alignment, cycle and contrastive terms of Nakano et al.
(:class:`CrossTaskJoint`) and SRDML's saliency relations
(:class:`~unirep.losses.saliency.SaliencyRelations`). Each has a weight and a linear ramp-up, and
owns its networks or state.

Every supervised loss respects the batch's per-task label mask: an unlabelled (sample, task)
contributes exactly zero loss and gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from unirep.batch import Batch
from unirep.config.schema import DistillConfig, PartialConfig, SaliencyConfig, TransferConfig
from unirep.errors import ConfigError
from unirep.losses import FEATURE_LOSSES, PREDICTION_LOSSES, TASK_LOSSES
from unirep.losses.bundle import LossBundle
from unirep.losses.contrastive import InfoNCEFeatureLoss
from unirep.losses.joint import JTRLoss, MTPSLLoss
from unirep.losses.saliency import SaliencyRelations
from unirep.losses.transfer import CrossTaskTerms
from unirep.tasks import Task


def annealing_factor(kind: str, step: int, total_steps: int) -> float:
    """Weight of the distillation terms at ``step``: ``linear`` decays 1 → 0, ``none`` keeps 1."""
    if kind == "none":
        return 1.0
    if kind == "linear":
        return max(0.0, 1.0 - step / max(1, total_steps))
    raise ValueError(f"unknown annealing {kind!r}; valid choices: linear, none")


def distillation_weights(cfg: DistillConfig, task: str) -> tuple[float, float]:
    """(λ_f·σ, λ_p·β) for ``task`` before annealing."""
    lam_f = cfg.lambda_feature.get(task, cfg.default_lambda)
    lam_p = cfg.lambda_prediction.get(task, cfg.default_lambda)
    return lam_f * cfg.feature_scale, lam_p * cfg.prediction_scale


def masked_loss(loss_fn: nn.Module, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``loss_fn`` over the samples labelled for the task (``mask``: bool ``[B]``).

    All labelled: the loss as it is. None labelled: an exact zero that keeps the graph (no NaN
    from an empty mean). Otherwise the loss of the labelled samples only.
    """
    if bool(mask.all()):
        return loss_fn(pred, target)
    if not bool(mask.any()):
        return pred.sum() * 0.0
    return loss_fn(pred[mask], target[mask])


def mixed_loss(
    loss_fn: nn.Module, pred: Tensor, target: Tensor, mask: Tensor, mix: tuple[Tensor, float] | None
) -> Tensor:
    """:func:`masked_loss`, with mixup's labels when the task's stream was mixed
    (:func:`unirep.batch.mix_batch`): ``λ·ℓ(ŷ, y) + (1 − λ)·ℓ(ŷ, y[perm])``."""
    loss = masked_loss(loss_fn, pred, target, mask)
    if mix is None:
        return loss
    perm, lam = mix
    return lam * loss + (1.0 - lam) * masked_loss(loss_fn, pred, target[perm], mask[perm])


class Objective(nn.Module):
    """Supervised losses of every task, plus URL distillation when ``distill`` is given.

    Args:
        tasks: the phase's tasks (their losses, weights and prediction-distillation choice).
        distill: the distillation settings (feature loss, λ, σ, β, annealing); None for teachers
            and the no-distillation baseline.
    """

    def __init__(
        self,
        tasks: dict[str, Task],
        distill: DistillConfig | None = None,
        joint: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.joint = nn.ModuleDict(joint or {})
        self.task_losses = nn.ModuleDict(
            {t: TASK_LOSSES.build(task.loss[0], **task.loss[1]) for t, task in tasks.items()}  # type: ignore[index]
        )
        self.distill = distill
        self.contrastive: nn.Module | None = None
        if distill is not None:
            self.feature_loss = FEATURE_LOSSES.build(
                distill.feature_loss.name, **distill.feature_loss.kwargs
            )
            self.contrastive = (
                InfoNCEFeatureLoss(distill.contrastive_temperature)
                if distill.contrastive_weight > 0
                else None
            )
            self.prediction_losses = nn.ModuleDict(
                {
                    t: PREDICTION_LOSSES.build(task.prediction_loss[0], **task.prediction_loss[1])
                    for t, task in tasks.items()
                    if task.prediction_loss is not None
                }
            )

    def own_lr_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """Parameters that keep their own learning rate in the main optimizer (MTPSL's FiLM)."""
        return [group for term in self.joint.values() for group in term.own_lr]

    @property
    def needs_teachers(self) -> bool:
        return self.distill is not None

    def forward(
        self,
        outputs: dict[str, dict[str, Tensor]],
        aligned: dict[str, list[Tensor]],
        batch: Batch,
        teacher_outputs: dict[str, dict[str, Tensor]] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> LossBundle:
        """Per-task losses of one micro-batch.

        Args:
            outputs: the student's ``{task: {"pred", "features", ...}}``.
            aligned: ``{task: [aligned student features]}`` from the alignment adapters.
            batch: targets and label masks.
            teacher_outputs: ``{task: {"pred", "features", ...}}`` of each frozen teacher.
            step, total_steps: for the annealing factor.
        """
        bundle = LossBundle(supervised={})
        for name, out in outputs.items():
            if name not in self.task_losses or name not in batch.targets:
                continue
            loss = mixed_loss(
                self.task_losses[name], out["pred"], batch.targets[name], batch.label_mask[name],
                batch.mix.get(self.tasks[name].stream),
            )  # fmt: skip
            bundle.supervised[name] = self.tasks[name].weight * loss
            bundle.logs[f"task/{name}"] = loss.detach()
        for name, term in self.joint.items():
            values, logs = term(outputs, batch, step)
            bundle.joint.update(values)
            bundle.logs.update({f"{name}/{k}": v for k, v in logs.items()})
        if self.distill is None:
            return bundle
        if teacher_outputs is None:
            raise ValueError("a distillation objective needs the teachers' outputs")
        anneal = annealing_factor(self.distill.annealing, step, total_steps)
        for name, out in outputs.items():
            if name not in teacher_outputs:
                continue
            teacher = teacher_outputs[name]
            w_f, w_p = distillation_weights(self.distill, name)
            terms: dict[str, Tensor] = {}
            if aligned.get(name):
                feat = torch.zeros((), device=out["pred"].device)
                for i, s_feat in enumerate(aligned[name]):
                    term = self.feature_loss(s_feat, teacher["features"])
                    feat = term if i == 0 else feat + term
                terms["feature"] = anneal * w_f * feat
                bundle.logs[f"feature/{name}"] = feat.detach()
            if name in self.prediction_losses:
                pred = self.prediction_losses[name](out["pred"], teacher["pred"])
                terms["prediction"] = anneal * w_p * pred
                bundle.logs[f"prediction/{name}"] = pred.detach()
            if self.contrastive is not None and aligned.get(name):
                nce = sum(self.contrastive(a, teacher["features"]) for a in aligned[name])
                terms["contrastive"] = anneal * self.distill.contrastive_weight * nce
                bundle.logs[f"contrastive/{name}"] = nce.detach()  # type: ignore[union-attr]
            bundle.distill[name] = terms
        bundle.logs["anneal"] = torch.tensor(anneal)
        return bundle


class JointTerm(nn.Module):
    """A loss over all tasks of a sample at once (partial labels: MTPSL or JTR), weighted by
    ``weight`` and ramped up linearly from 0 over ``rampup_steps`` (MTPSL's ``--rampup``).

    ``loss(preds, targets, masks[, feature])`` returns a scalar or ``(total, {part: detached
    value})``; ``feature``, the student's bottleneck ``[B, C, h, w]``, is passed when the loss has
    ``uses_feature`` (MTPSL's regulariser).
    Its parameters (the mapping network, the joint-space encoder–decoder) are trained with the
    student, checkpointed with it and never exported.
    """

    def __init__(
        self,
        name: str,
        loss: nn.Module,
        weight: float,
        rampup_steps: int = 0,
        own_lr: list[tuple[list[nn.Parameter], float]] | None = None,
        uses_feature: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.loss, self.weight, self.rampup_steps = loss, float(weight), int(rampup_steps)
        self.uses_feature = uses_feature
        self.own_lr = list(own_lr or [])  # (parameters, learning rate), e.g. MTPSL's FiLM

    def factor(self, step: int) -> float:
        return rampup(self.weight, self.rampup_steps, step)

    def forward(
        self, outputs: dict[str, dict[str, Tensor]], batch: Batch, step: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``({name: weighted loss}, {part: detached value})``."""
        preds = {t: out["pred"] for t, out in outputs.items() if t in batch.targets}
        args: list[Any] = [
            preds,
            {t: batch.targets[t] for t in preds},
            {t: batch.label_mask[t] for t in preds},
        ]
        if self.uses_feature:  # MTPSL's regulariser
            args.append(next(iter(outputs.values()))["bottleneck"])
        result = self.loss(*args)
        total, parts = result if isinstance(result, tuple) else (result, {})
        total = total + touch_parameters(self.loss, total)
        return {self.name: self.factor(step) * total}, {"loss": total.detach(), **parts}


def rampup(weight: float, rampup_steps: int, step: int) -> float:
    """``weight`` ramped up linearly from 0 over ``rampup_steps`` (MTPSL's ``--rampup``)."""
    if rampup_steps <= 0:
        return float(weight)
    return float(weight) * min(1.0, step / rampup_steps)


def touch_parameters(module: nn.Module, like: Tensor) -> Tensor:
    """An exact zero that uses every parameter of ``module``: each then takes part in the
    backward (with a zero gradient when a batch has no use for it), so DDP's reducer never waits
    for an unused one."""
    return sum((p.reshape(-1)[0] * 0.0 for p in module.parameters()), like.new_zeros(()))


class CrossTaskJoint(nn.Module):
    """The cross-task terms of Nakano, Chen & Demachi (2021) on the student's predictions:
    ``consistency``, ``alignment`` (masked by the batch's label masks), ``cycle`` and
    ``contrastive``, each with its weight and ramp-up, sharing one set of task-transfer networks
    (:class:`unirep.losses.transfer.CrossTaskTerms`), trained with the student, never exported.
    Their bundle names are ``xtask_<term>``."""

    def __init__(self, terms: nn.Module, schedule: dict[str, tuple[float, int]]) -> None:
        super().__init__()
        self.terms = terms
        self.schedule = dict(schedule)  # term → (weight, ramp-up steps)
        self.own_lr: list[tuple[list[nn.Parameter], float]] = []

    def forward(
        self, outputs: dict[str, dict[str, Tensor]], batch: Batch, step: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        preds = {t: out["pred"] for t, out in outputs.items() if t in batch.targets}
        values = self.terms(
            preds,
            {t: batch.targets[t] for t in preds},
            {t: batch.label_mask[t] for t in preds},
        )
        first = next(iter(values.values()))
        values[next(iter(values))] = first + touch_parameters(self.terms, first)
        weighted = {
            f"xtask_{name}": rampup(*self.schedule[name], step) * value
            for name, value in values.items()
        }
        return weighted, {name: value.detach() for name, value in values.items()}


def build_joint_terms(
    partial: PartialConfig, tasks: dict[str, Task], feature_channels: int
) -> dict[str, JointTerm]:
    """The joint term ``partial.method`` names (``{}`` for ``none``)."""
    if partial.method == "none":
        return {}
    kinds = {t: task.kind for t, task in tasks.items()}
    channels = {t: task.out_channels for t, task in tasks.items()}
    loss: nn.Module
    if partial.method == "mtpsl":
        m = partial.mtpsl
        loss = MTPSLLoss(
            kinds, channels, feature_channels, lambda_reg=m.lambda_reg, mode=m.mode,
            widths=tuple(m.widths),
        )  # fmt: skip
    elif partial.method == "jtr":
        j = partial.jtr
        loss = JTRLoss(
            kinds, channels, distance_weight=j.distance_weight,
            reconstruction_weight=j.reconstruction_weight, widths=tuple(j.widths),
        )  # fmt: skip
    else:
        raise ValueError(f"unknown partial-label method {partial.method!r}")
    mtpsl = partial.method == "mtpsl"
    own_lr = [(list(loss.film_parameters()), partial.mtpsl.film_lr)] if mtpsl else []
    term = JointTerm(
        partial.method, loss, partial.weight, partial.rampup_steps, own_lr, uses_feature=mtpsl
    )
    return {partial.method: term}


def build_cross_task_terms(
    transfer: TransferConfig, tasks: dict[str, Task]
) -> dict[str, nn.Module]:
    """``{"xtask": CrossTaskJoint}`` with the terms of ``xtask`` whose weight is above 0 (``{}``
    when none is)."""
    active = transfer.active()
    if not active:
        return {}
    terms = CrossTaskTerms(
        {t: task.kind for t, task in tasks.items()},
        {t: task.out_channels for t, task in tasks.items()},
        pairs=[(a, b) for a, b in transfer.pairs] if transfer.pairs else None,
        terms=tuple(active),
        widths=tuple(transfer.widths),
        class_distance=transfer.class_distance,
        temperature=transfer.temperature,
        embed_dim=transfer.embed_dim,
    )
    schedule = {n: (t.weight, t.rampup_steps) for n, t in active.items()}
    return {"xtask": CrossTaskJoint(terms, schedule)}


def build_saliency_terms(
    saliency: SaliencyConfig | None, tasks: dict[str, Task], net: nn.Module
) -> dict[str, nn.Module]:
    """``{"srdml": SaliencyRelations}`` when ``saliency`` is set with a weight above 0 (``{}``
    otherwise); sets ``net.task_views`` so that its outputs give each task's view of the shared
    stages (:class:`~unirep.models.dense.DenseMultiTaskNet`)."""
    if saliency is None or saliency.weight == 0:
        return {}
    if not hasattr(net, "task_views"):
        raise ConfigError(
            f"config key 'dense.saliency': a {type(net).__name__} student cannot give each task "
            "its own view of a shared encoder; valid: a DenseMultiTaskNet, or dense.saliency=null"
        )
    net.task_views = True
    term = SaliencyRelations(
        list(tasks),
        {t: task.kind.has_classes for t, task in tasks.items()},
        weight=saliency.weight,
        rampup_steps=saliency.rampup_steps,
        relation_lr=saliency.relation_lr,
        floor=saliency.floor,
    )
    return {"srdml": term}
