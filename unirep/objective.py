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

from unirep.config import DistillConfig
from unirep.losses import FEATURE_LOSSES, PREDICTION_LOSSES, TASK_LOSSES


def annealing_factor(kind: str, step: int, total_steps: int) -> float:
    """Weight of the distillation terms at ``step``: ``linear`` decays 1 → 0, ``none`` keeps 1."""
    if kind == "none":
        return 1.0
    if kind == "linear":
        return max(0.0, 1.0 - step / max(1, total_steps))
    raise ValueError(f"unknown annealing {kind!r}; valid choices: linear, none")


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
        lam_f = self.cfg.lambda_feature.get(domain, self.cfg.default_lambda)
        lam_p = self.cfg.lambda_prediction.get(domain, self.cfg.default_lambda)
        return lam_f * self.cfg.feature_scale, lam_p * self.cfg.prediction_scale

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
