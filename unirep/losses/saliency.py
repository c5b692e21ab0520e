"""Task relations from input-gradient saliency: SRDML (Bai & Zhao, "Saliency-Regularized Deep
Multi-Task Learning", KDD 2022, arXiv 2207.01117; code ``BaiTheBest/SRDML``, TensorFlow 2).

Each task ``t`` has a saliency of the shared feature ``h = g(x)``: how its output ``y_t`` would
change if ``h`` changed, pooled over space into a channel vector (Grad-CAM style)::

    α_t(x) = Σ_{spatial} ∂y_t(x) / ∂h          [C]          (the reference's 1/Z with Z = 1)

and the objective adds, over the pairs of tasks ``u < v``, with a learned relation ``c ≥ 0``::

    R = Σ_{u<v} (c_uv / Σc) · D_uv,   D_uv = mean_batch ‖α_u(x) − α_v(x)‖₁      (term: μ · R)

Tasks whose saliencies are pulled together share what in the feature drives them; ``c`` says
which pairs the network is asked to align. ``c`` is not trained by the optimiser: after each
training forward it takes the reference's manual gradient step, ``G_uv = μ (D_uv / Σc − Σ c D /
(Σc)²)``, ``c ← c − relation_lr · G``, then a projection.

What ``y_t`` is for a dense task (the reference has one logit per binary classification task and
differentiates that logit, Grad-CAM's class score): a per-sample scalar, the **mean over pixels of
the task's output score**. For a task with classes (segmentation logits ``[B, K, H, W]``) the
score of a pixel is the logit of its predicted class (argmax, held fixed: Grad-CAM's score of the
class it explains, Seg-Grad-CAM's sum over the region, here every pixel); for a regression
(depth ``[B, 1, H, W]``, unit normals ``[B, 3, H, W]``) it is the sum of the output channels
(the depth itself; for normals the component along (1, 1, 1), a fixed direction: the normalised
vector's score would otherwise be constant). No label is used, so unlabelled samples count too.
Because ``y_t`` is a pixel mean and ``α_t`` a spatial sum, ``α_t`` is the change of the task's
mean output per unit uniform shift of each channel: independent of the resolution.

The shared feature of a pyramid decoder is every encoder stage it reads: ``α_t`` concatenates the
spatially summed gradients of all stages, ``[B, Σ_i C_i]`` (wider stages weigh more in ``‖·‖₁``).
Each stage's gradient is w.r.t. the stage as the task's decoder reads it (the reference's
``feature_map[e]`` fed to the head): a path from an early stage through a later one inside the
shared encoder is the later stage's gradient, not counted twice.

**Batched.** The reference loops over samples and tasks (``B × T`` small backward passes). Here
the network gives each task's decoder its own view of the shared stages
(:class:`~unirep.models.dense.DenseMultiTaskNet` with ``task_views``, ``outputs[t]["shared"]``);
one ``torch.autograd.grad(Σ_t Σ_b y_t[b], every task's views, create_graph=True)`` then gives
every task's per-sample gradient at once: the gradient w.r.t. task ``t``'s view comes through
``t``'s decoder only, and sample ``b``'s output depends on sample ``b``'s feature only. The
second claim fails with batch norm in training mode, which couples the samples of a batch (each
``α_t(x_b)`` then carries a small term through the batch statistics); the per-sample reference
test uses evaluation mode.

Departures from the reference, and why:

- ``D`` is the batch mean of the distances (the reference sums them over its 200 samples while its
  cross-entropy is a mean, so its μ grows with the batch size);
- ``c`` takes a plain gradient step with its own step size (the reference reuses the network's
  Adam), and is projected onto the **floored simplex** ``{c_uv ≥ floor, Σc = 1}`` (Euclidean
  projection, Duchi et al. 2008) instead of a ReLU: the ReLU lets every ``c_uv`` reach 0 and
  ``c / Σc`` divide by zero, and minimising over ``c`` alone moves all the mass onto the closest
  pair (the simplex only ties the pairs together); with the floor every pair keeps a weight of at
  least ``floor`` and at most ``1 − (P − 1)·floor`` (``P`` pairs);
- the step uses ``D`` averaged over processes, so every process holds the same ``c``; a
  non-finite ``D`` leaves ``c`` unchanged.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from unirep.batch import Batch

__all__ = [
    "SaliencyRelations",
    "pair_distances",
    "project_floored_simplex",
    "relation_gradient",
    "relation_step",
    "saliency",
    "task_scores",
]

_EPS = 1e-12


def task_scores(preds: dict[str, Tensor], has_classes: dict[str, bool]) -> dict[str, Tensor]:
    """``y_t`` per sample, ``{task: [B]}``, from the predictions ``{task: [B, K_t, H, W]}``: the
    pixel mean of the predicted class's logit (``has_classes``) or of the channels' sum."""
    scores = {}
    for task, pred in preds.items():
        if has_classes[task]:
            picked = pred.argmax(dim=1, keepdim=True)  # no gradient: the class is held fixed
            score = pred.gather(1, picked)
        else:
            score = pred.sum(dim=1, keepdim=True)
        scores[task] = score.flatten(1).mean(dim=1)
    return scores


def saliency(scores: dict[str, Tensor], views: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """Every task's per-sample pooled saliency ``{task: [B, Σ_i C_i]}`` in one double backward.

    Args:
        scores: ``{task: y_t [B]}`` (:func:`task_scores`).
        views: ``{task: [its view of shared stage i, [B, C_i, H_i, W_i]]}``; task ``t``'s scores
            must reach its own views only.

    The gradient keeps its graph (``create_graph``), so a loss on it trains the network; a view
    no score reaches gives zeros.
    """
    tasks = list(scores)
    flat = [v for t in tasks for v in views[t]]
    total = torch.stack([scores[t].sum() for t in tasks]).sum()
    grads = torch.autograd.grad(total, flat, create_graph=True, allow_unused=True)
    pooled, k = {}, 0
    for t in tasks:
        parts = []
        for view in views[t]:
            grad = grads[k] if grads[k] is not None else torch.zeros_like(view)
            wide = torch.promote_types(grad.dtype, torch.float32)  # fp16/bf16 up, never down
            parts.append(grad.to(wide).sum(dim=(2, 3)))  # [B, C_i]
            k += 1
        pooled[t] = torch.cat(parts, dim=1)
    return pooled


def pair_distances(alpha: dict[str, Tensor], pairs: list[tuple[str, str]]) -> Tensor:
    """``D`` ``[P]``: per pair ``(u, v)`` the batch mean of ``‖α_u − α_v‖₁`` (α: ``[B, C]``)."""
    return torch.stack([(alpha[u] - alpha[v]).abs().sum(dim=1).mean() for u, v in pairs])


def relation_gradient(c: Tensor, distances: Tensor, mu: float) -> Tensor:
    """The reference's analytic gradient of ``μ·Σ (c/Σc)·D`` w.r.t. ``c`` (both ``[P]``):
    ``G = μ (D / Σc − Σ c D / (Σc)²)``, with ``Σc`` kept away from 0."""
    total = c.sum().clamp_min(_EPS)
    return mu * (distances / total - (c * distances).sum() / total**2)


def project_floored_simplex(c: Tensor, floor: float) -> Tensor:
    """The Euclidean projection of ``c`` ``[P]`` onto ``{x_p ≥ floor, Σ x = 1}`` (needs
    ``P·floor ≤ 1``): ``floor + `` the projection of ``c − floor`` onto the simplex of mass
    ``1 − P·floor`` (Duchi et al., ICML 2008, by sorting). Never divides by zero; a non-finite
    ``c`` gives the uniform point."""
    n = c.numel()
    mass = 1.0 - n * floor
    if mass < -1e-9:
        raise ValueError(f"floor {floor} is above 1/{n}: no relation can satisfy it")
    if mass <= 0 or not bool(torch.isfinite(c).all()):
        return torch.full_like(c, 1.0 / n)
    x = c - floor
    u, _ = torch.sort(x, descending=True)
    ranks = torch.arange(1, n + 1, dtype=c.dtype, device=c.device)
    css = torch.cumsum(u, dim=0) - mass
    rho = int((u - css / ranks > 0).nonzero().max())  # ≥ 0: the largest entry always passes
    theta = css[rho] / (rho + 1)
    return floor + (x - theta).clamp_min(0.0)


def relation_step(c: Tensor, distances: Tensor, mu: float, lr: float, floor: float) -> Tensor:
    """One update of ``c`` ``[P]``: the reference's gradient step, then the floored projection;
    ``c`` unchanged (projected) when ``distances`` is not finite."""
    if not bool(torch.isfinite(distances).all()):
        return project_floored_simplex(c, floor)
    return project_floored_simplex(c - lr * relation_gradient(c, distances, mu), floor)


def _mean_over_processes(x: Tensor) -> Tensor:
    """``x`` averaged over the default process group (a collective); ``x`` without one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / dist.get_world_size()


class SaliencyRelations(nn.Module):
    """SRDML's regulariser as a joint term of the objective (bundle name ``srdml``).

    Args:
        tasks: the tasks, in order; pairs are ``(u, v)`` with ``u`` before ``v``.
        has_classes: ``{task: whether its score is the predicted class's logit}``.
        weight: μ (the reference's 0.1); the term is ``rampup(μ) · R``.
        rampup_steps: linear ramp-up of the term from 0 (``c`` learns from the start).
        relation_lr: step size of ``c``'s manual gradient step.
        floor: the least weight of a pair (``≤ 1/P``).

    ``forward(outputs, batch, step)`` reads ``outputs[t]["pred"]`` and ``outputs[t]["shared"]``
    and returns ``({"srdml": μ·R}, logs)``, logs ``loss`` (``R``), ``distance/<u>-<v>`` and
    ``relation/<u>-<v>`` (``c`` after this step). ``c`` (buffer ``relation`` ``[P]``, uniform at
    start) is checkpointed with the module and changes only in training with gradients enabled,
    once per forward (per micro-batch; per task group with ``alternating``); without gradients
    (FAMO's look after the step) the term is an exact zero.
    """

    def __init__(
        self,
        tasks: list[str],
        has_classes: dict[str, bool],
        weight: float = 0.1,
        rampup_steps: int = 0,
        relation_lr: float = 0.01,
        floor: float = 0.05,
    ) -> None:
        super().__init__()
        if len(tasks) < 2:
            raise ValueError(f"task relations need 2+ tasks, got {tasks}")
        self.tasks = list(tasks)
        self.pairs = list(combinations(self.tasks, 2))
        if floor * len(self.pairs) > 1 + 1e-9:
            raise ValueError(f"floor {floor} is above 1/{len(self.pairs)} (the pairs' share)")
        self.has_classes = dict(has_classes)
        self.weight, self.rampup_steps = float(weight), int(rampup_steps)
        self.relation_lr, self.floor = float(relation_lr), float(floor)
        self.own_lr: list[tuple[list[nn.Parameter], float]] = []
        self.updates = 0  # updates of c in this process (0: c is not this run's, e.g. reloaded)
        self.register_buffer("relation", torch.full((len(self.pairs),), 1.0 / len(self.pairs)))

    @property
    def pair_names(self) -> list[str]:
        return [f"{u}-{v}" for u, v in self.pairs]

    def forward(
        self, outputs: dict[str, dict[str, Any]], batch: Batch, step: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``({"srdml": weighted R}, {part: detached value})`` of one micro-batch."""
        first = outputs[self.tasks[0]]["pred"]
        if not torch.is_grad_enabled():
            return {"srdml": first.sum() * 0.0}, self._logs(None)
        missing = [t for t in self.tasks if "shared" not in outputs[t]]
        if missing:
            raise ValueError(
                f"SRDML needs each task's view of the shared stages (outputs[t]['shared']), "
                f"missing for {missing}: build the network with task_views"
            )
        preds = {t: outputs[t]["pred"] for t in self.tasks}
        views = {t: list(outputs[t]["shared"]) for t in self.tasks}
        alpha = saliency(task_scores(preds, self.has_classes), views)
        distances = pair_distances(alpha, self.pairs)  # [P], with the graph
        c = self.relation.clone()  # this step's weights; the buffer changes below
        regulariser = (c / c.sum().clamp_min(_EPS) * distances).sum()
        if self.training:  # the reference's update of c, from every process's batch
            found = _mean_over_processes(distances.detach())
            self.relation.copy_(relation_step(c, found, self.weight, self.relation_lr, self.floor))
            self.updates += 1
        ramp = min(1.0, step / self.rampup_steps) if self.rampup_steps > 0 else 1.0
        value = ramp * self.weight * regulariser
        return {"srdml": value}, self._logs(distances.detach(), regulariser.detach())

    def _logs(self, distances: Tensor | None, loss: Tensor | None = None) -> dict[str, Tensor]:
        logs = {f"relation/{n}": self.relation[i].clone() for i, n in enumerate(self.pair_names)}
        if distances is not None and loss is not None:
            logs["loss"] = loss
            logs.update({f"distance/{n}": distances[i] for i, n in enumerate(self.pair_names)})
        return logs

    def record(self, relation: list[float] | None = None) -> dict[str, Any]:
        """``metrics.json``'s ``summary.saliency``: the settings and the relation ``c`` (the
        buffer, or ``relation`` in pair order) per pair (``u-v``) and as a symmetric matrix over
        ``tasks`` (0 on the diagonal)."""
        values = [float(v) for v in (self.relation.tolist() if relation is None else relation)]
        matrix = [[0.0] * len(self.tasks) for _ in self.tasks]
        index = {t: i for i, t in enumerate(self.tasks)}
        for (u, v), value in zip(self.pairs, values, strict=True):
            matrix[index[u]][index[v]] = matrix[index[v]][index[u]] = value
        return {
            "method": "srdml",
            "weight": self.weight,
            "rampup_steps": self.rampup_steps,
            "relation_lr": self.relation_lr,
            "floor": self.floor,
            "tasks": list(self.tasks),
            "relation": dict(zip(self.pair_names, values, strict=True)),
            "matrix": matrix,
            "closest": self.pair_names[max(range(len(values)), key=values.__getitem__)],
        }
