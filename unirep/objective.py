"""The training objectives: what the loop minimises. Each returns a dict; the loop reads ``loss``.

Universal Representations (Li, Liu & Bilen, IJCV 2023, Eq. 3), per domain ``d``::

    L_d = ℓ_task(s_d, y) + a(t)·σ·λ_f,d·ℓ_f(A_d(φ(x)), φ_d(x)) + a(t)·β·λ_p,d·ℓ_p(s_d, t_d)

summed over domains, where ``A_d`` is the alignment adapter, ``φ_d`` the frozen teacher and
``a(t)`` the annealing factor (URL: linear from 1 to 0 over training). The other entries of the
returned dict are detached terms for logging: ``task/<d>``, ``feature/<d>``, ``prediction/<d>``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unirep.config import DenseTaskConfig, DistillConfig
from unirep.losses import FEATURE_LOSSES, PREDICTION_LOSSES, TASK_LOSSES


def annealing_factor(kind: str, step: int, total_steps: int) -> float:
    """Weight of the distillation terms at ``step``: ``linear`` decays 1 → 0, ``none`` keeps 1."""
    if kind == "none":
        return 1.0
    if kind == "linear":
        return max(0.0, 1.0 - step / max(1, total_steps))
    raise ValueError(f"unknown annealing {kind!r}; valid choices: linear, none")


def distillation_weights(cfg: DistillConfig, key: str) -> tuple[float, float]:
    """(λ_f·σ, λ_p·β) for a domain or dense task ``key`` before annealing."""
    lam_f = cfg.lambda_feature.get(key, cfg.default_lambda)
    lam_p = cfg.lambda_prediction.get(key, cfg.default_lambda)
    return lam_f * cfg.feature_scale, lam_p * cfg.prediction_scale


class TaskObjective(nn.Module):
    """Sum over domains of the supervised loss (teachers and the no-distillation baseline)."""

    needs_teachers = False

    def __init__(self, cfg: DistillConfig) -> None:
        super().__init__()
        self.task_loss = TASK_LOSSES.build(cfg.task_loss.name, **cfg.task_loss.kwargs)

    def forward(
        self,
        outputs: dict[str, dict[str, Tensor]],
        labels: dict[str, Tensor],
        teacher_outputs: dict[str, dict[str, Tensor]] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        total = torch.zeros((), device=next(iter(labels.values())).device)
        for domain, out in outputs.items():
            task = self.task_loss(out["logits"], labels[domain])
            total = total + task
            terms[f"task/{domain}"] = task.detach()
        return {"loss": total, **terms}


class DistillationObjective(TaskObjective):
    """Task loss plus annealed, per-domain feature and prediction distillation (URL)."""

    needs_teachers = True

    def __init__(self, cfg: DistillConfig) -> None:
        super().__init__(cfg)
        self.cfg = cfg
        self.feature_loss = FEATURE_LOSSES.build(cfg.feature_loss.name, **cfg.feature_loss.kwargs)
        self.prediction_loss = PREDICTION_LOSSES.build(
            cfg.prediction_loss.name, **cfg.prediction_loss.kwargs
        )

    def weights(self, domain: str) -> tuple[float, float]:
        """(λ_f·σ, λ_p·β) for ``domain`` before annealing."""
        return distillation_weights(self.cfg, domain)

    def forward(
        self,
        outputs: dict[str, dict[str, Tensor]],
        labels: dict[str, Tensor],
        teacher_outputs: dict[str, dict[str, Tensor]] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> dict[str, Tensor]:
        if teacher_outputs is None:
            raise ValueError("DistillationObjective needs the teachers' outputs")
        result = super().forward(outputs, labels)
        total = result["loss"]
        anneal = annealing_factor(self.cfg.annealing, step, total_steps)
        for domain, out in outputs.items():
            teacher = teacher_outputs[domain]
            w_f, w_p = self.weights(domain)
            feat = self.feature_loss(out["aligned"], teacher["features"])
            pred = self.prediction_loss(out["logits"], teacher["logits"])
            total = total + anneal * (w_f * feat + w_p * pred)
            result[f"feature/{domain}"] = feat.detach()
            result[f"prediction/{domain}"] = pred.detach()
        result["loss"] = total
        result["anneal"] = torch.tensor(anneal)
        return result


def build_objective(cfg: DistillConfig, distill: bool) -> TaskObjective:
    """The student's objective (``distill``) or the plain task objective."""
    return DistillationObjective(cfg) if distill else TaskObjective(cfg)


# --------------------------------------------------------------------------------------------
# Dense multi-task prediction


class DenseTaskObjective(nn.Module):
    """Weighted sum over tasks of the supervised dense losses (teachers and the baseline).

    ``outputs[t]["pred"]`` is ``[B, K_t, H, W]`` (segmentation logits, depth ``K = 1``, unit
    normals ``K = 3``) and ``targets[t]`` the matching map (``semantic`` ``[B, H, W]`` with -1
    ignored, ``depth`` ``[B, 1, H, W]`` with 0 invalid, ``normal`` ``[B, 3, H, W]`` all-zero
    invalid). Uniform weights by default, as MTAN's ``equal`` and URL's NYUv2 student.
    """

    needs_teachers = False

    def __init__(self, tasks: dict[str, DenseTaskConfig]) -> None:
        super().__init__()
        self.weight = {t: spec.weight for t, spec in tasks.items()}
        self.task_losses = nn.ModuleDict(
            {t: TASK_LOSSES.build(spec.loss.name, **spec.loss.kwargs) for t, spec in tasks.items()}
        )

    def forward(
        self,
        outputs: dict[str, dict[str, Tensor]],
        targets: dict[str, Tensor],
        teacher_outputs: dict[str, dict[str, Tensor]] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        total = torch.zeros((), device=next(iter(targets.values())).device)
        for task, out in outputs.items():
            loss = self.task_losses[task](out["pred"], targets[task])
            total = total + self.weight[task] * loss
            terms[f"task/{task}"] = loss.detach()
        return {"loss": total, **terms}


class DenseDistillationObjective(DenseTaskObjective):
    """Dense URL: task losses + per-task feature distillation (+ optional prediction distillation).

    For each task ``t`` with teacher ``φ_t`` (Li, Liu & Bilen, IJCV 2023, NYUv2 setting)::

        L_t = w_t·ℓ_t(ŷ_t, y_t) + a(s)·σ·λ_f,t·[ℓ_f(A_t^b(g), φ_t(x)) + ℓ_f(A_t^d(f_t), φ_t(x))]
              + a(s)·β·λ_p,t·ℓ_p,t(ŷ_t, φ_t's prediction)

    where ``g`` is the student's bottleneck ``[B, C, H/32, W/32]`` (the adapter output is
    upsampled bilinearly to the teacher's size by the loss), ``f_t`` the task's last decoder
    feature ``[B, D, H_0, W_0]``, ``A^b_t``/``A^d_t`` the two 1×1 alignment adapters and
    ``φ_t(x)`` the teacher's last decoder feature. ``ℓ_f`` is the channel-normalised pixel-wise
    L2 (``l2``); URL uses ``λ_f = 1, 1, 2`` for semantic, depth, normal. ``ℓ_p,t`` is per task
    (``kl`` with temperature on segmentation logits, ``dense_l1`` on depth or normals), off when
    the task's ``prediction_loss`` is None. ``a(s)`` is the annealing factor.
    """

    needs_teachers = True

    def __init__(self, tasks: dict[str, DenseTaskConfig], cfg: DistillConfig) -> None:
        super().__init__(tasks)
        self.cfg = cfg
        self.feature_loss = FEATURE_LOSSES.build(cfg.feature_loss.name, **cfg.feature_loss.kwargs)
        self.prediction_losses = nn.ModuleDict(
            {
                t: PREDICTION_LOSSES.build(spec.prediction_loss.name, **spec.prediction_loss.kwargs)
                for t, spec in tasks.items()
                if spec.prediction_loss is not None
            }
        )

    def forward(
        self,
        outputs: dict[str, dict[str, Tensor]],
        targets: dict[str, Tensor],
        teacher_outputs: dict[str, dict[str, Tensor]] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> dict[str, Tensor]:
        if teacher_outputs is None:
            raise ValueError("DenseDistillationObjective needs the teachers' outputs")
        result = super().forward(outputs, targets)
        total = result["loss"]
        anneal = annealing_factor(self.cfg.annealing, step, total_steps)
        for task, out in outputs.items():
            teacher = teacher_outputs[task]
            w_f, w_p = distillation_weights(self.cfg, task)
            feat = self.feature_loss(out["aligned_bottleneck"], teacher["features"])
            feat = feat + self.feature_loss(out["aligned_features"], teacher["features"])
            total = total + anneal * w_f * feat
            result[f"feature/{task}"] = feat.detach()
            if task in self.prediction_losses:
                pred = self.prediction_losses[task](out["pred"], teacher["pred"])
                total = total + anneal * w_p * pred
                result[f"prediction/{task}"] = pred.detach()
        result["loss"] = total
        result["anneal"] = torch.tensor(anneal)
        return result


def build_dense_objective(
    tasks: dict[str, DenseTaskConfig], cfg: DistillConfig, distill: bool
) -> DenseTaskObjective:
    """The dense student's objective (``distill``) or the plain multi-task objective."""
    return DenseDistillationObjective(tasks, cfg) if distill else DenseTaskObjective(tasks)
