"""One trainable module per phase: everything a phase optimises, nothing it does not.

Like timm's ``FeatureDistillationTrainableModule``, the student, its alignment adapters, the
objective (and any auxiliary network a loss owns) and the weighting (and its state, e.g.
uncertainty log-variances) sit in one ``nn.Module``: it alone goes to ``accelerator.prepare``
(DDP), to the optimizers and to the checkpoint. Frozen teachers stay outside it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from unirep.batch import Batch
from unirep.losses.bundle import LossBundle
from unirep.objective import Objective, masked_loss
from unirep.training.diagnostics import TaskDiagnostics
from unirep.weighting import Weighting


class TrainableModule(nn.Module):
    """Student + alignment adapters + objective + weighting.

    Args:
        student: the network that is exported (``forward(inputs) -> {task: outputs}``, with
            ``shared_parameters()``).
        objective: returns the per-task :class:`LossBundle`.
        weighting: turns the bundle into gradients.
        aligners: ``{task: module(student output) -> [aligned features]}``; empty for teachers
            and the baseline. They get their own optimizer (``train.adapter_optim``).
        diagnostics_every: measure task dominance and gradient cosines on the shared trunk every
            N optimizer steps (:mod:`unirep.training.diagnostics`; 0: never).
    """

    def __init__(
        self,
        student: nn.Module,
        objective: Objective,
        weighting: Weighting,
        aligners: nn.ModuleDict | None = None,
        diagnostics_every: int = 0,
    ) -> None:
        super().__init__()
        self.student = student
        self.aligners = aligners if aligners is not None else nn.ModuleDict()
        self.objective = objective
        self.weighting = weighting
        weighting.bind_shared(self.shared_parameters())  # state shaped like them, before a resume
        self.diagnostics: TaskDiagnostics | None = None
        if diagnostics_every > 0 and len(weighting.tasks) > 1:
            trunk: nn.Module = student.trunk  # type: ignore[assignment]
            named = [(n, p) for n, p in trunk.named_parameters() if p.requires_grad]
            self.diagnostics = TaskDiagnostics(weighting.tasks, named, diagnostics_every)

    def forward(
        self,
        batch: Batch,
        teacher_outputs: dict[str, dict[str, Tensor]] | None = None,
        step: int = 0,
        total_steps: int = 1,
        tasks: list[str] | None = None,
        joint: bool = True,
    ) -> LossBundle:
        """The losses of one micro-batch (inside ``forward`` so that DDP sees every use). When the
        weighting works on the shared representation (``mgda_ub``), every tensor the student's
        trunk returns is kept in ``bundle.shared``. With ``tasks``, only those tasks' terms (and
        the joint ones when ``joint``) are returned, the whole loss going to ``logs["loss"]``.
        """
        captured: list[Tensor] = []
        hook = None
        if getattr(self.weighting, "wants_representation", False) and torch.is_grad_enabled():
            trunk: nn.Module = self.student.trunk  # type: ignore[assignment]
            hook = trunk.register_forward_hook(
                lambda _m, _i, out: captured.extend(out if isinstance(out, list | tuple) else [out])
            )
        # a gradient weighting on the Gramian path hooks the trunk for this forward (torchjd's
        # autogram engine): the Gramian comes at its backward, without the [T, P] Jacobian
        make_engine = getattr(self.weighting, "gramian_engine", None)
        engine = None
        if make_engine is not None and torch.is_grad_enabled() and self.training:
            engine = make_engine(self.student.trunk)
        try:
            outputs = self.student(batch.inputs)
        finally:
            if hook is not None:
                hook.remove()
            if engine is not None:
                engine.release()
        aligned = {t: self.aligners[t](outputs[t]) for t in self.aligners if t in outputs}
        bundle = self.objective(outputs, aligned, batch, teacher_outputs, step, total_steps)
        bundle.shared = [t for t in captured if isinstance(t, Tensor)]
        bundle.gramian_engine = engine
        gates = getattr(self.student, "gate_log", None)  # a student that learns its sharing
        if gates is not None:
            bundle.logs = {**bundle.logs, **gates()}
        regularizer = getattr(self.student, "regularizer", None)  # e.g. AutoMTL's sharing cost
        cost = regularizer() if regularizer is not None and self.training else None
        if cost is not None:
            bundle.joint["sharing_cost"] = cost
            bundle.logs = {**bundle.logs, "sharing_cost": cost.detach()}
        if tasks is not None:  # only these tasks' terms leave forward: DDP sees the rest unused
            total = bundle.total().detach()
            bundle = bundle.only(tasks, joint)
            bundle.logs = {**bundle.logs, "loss": total}
        return bundle

    def supervised_losses(self, batch: Batch) -> dict[str, Tensor]:
        """Each task's unweighted supervised loss on ``batch`` (its label masks respected), from
        one forward of the student: what DiSparse scores the weights with."""
        outputs = self.student(batch.inputs)
        losses = self.objective.task_losses
        return {
            t: masked_loss(losses[t], out["pred"], batch.targets[t], batch.label_mask[t])
            for t, out in outputs.items()
            if t in losses and t in batch.targets
        }

    def after_update(self, batch: Batch, done: int, total_steps: int, accelerator: Any) -> None:
        """After each optimizer step: a student that changes itself between steps (DiSparse's
        masks, :meth:`unirep.models.pruning.DiSparseNet.after_update`) does so here, with the
        step's last micro-batch."""
        update = getattr(self.student, "after_update", None)
        if update is not None:
            update(done, total_steps, lambda: self.supervised_losses(batch), accelerator)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(main optimizer's parameters, alignment adapters' parameters), from the modules:
        the student, the objective's and the weighting's own parameters go to the main one
        (the weighting's :meth:`~unirep.weighting.Weighting.optimized_parameters`: a method
        that updates its state itself, like FAMO, keeps it out)."""
        main = [
            p
            for module in (self.student, self.objective)
            for p in module.parameters()
            if p.requires_grad
        ] + self.weighting.optimized_parameters()
        adapters = [p for p in self.aligners.parameters() if p.requires_grad]
        return main, adapters

    def optimizer_groups(self) -> tuple[list[dict[str, Any]], list[nn.Parameter]]:
        """:meth:`parameter_groups` as torch optimizer parameter groups: the main optimizer's
        parameters, then one group per set with its own learning rate (the objective's and the
        student's ``own_lr_groups``, e.g. MTPSL's FiLM at 1e-3 beside the network's 1e-4,
        AutoMTL's policy at 1e-2)."""
        main, adapters = self.parameter_groups()
        own = getattr(self.student, "own_lr_groups", None)  # e.g. AutoMTL's policy
        special = self.objective.own_lr_groups() + (own() if own is not None else [])
        taken = {id(p) for params, _ in special for p in params}
        groups: list[dict[str, Any]] = [{"params": [p for p in main if id(p) not in taken]}]
        groups += [{"params": params, "lr": lr} for params, lr in special if params]
        return groups, adapters

    def named_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part (``student.<child>``, ``aligners.<task>``,
        ``objective``, ``weighting``): the names a non-finite gradient is reported under."""
        parts: dict[str, nn.Module] = {
            **{f"student.{n}": m for n, m in self.student.named_children()},
            **{f"aligners.{n}": m for n, m in self.aligners.named_children()},
            "objective": self.objective,
            "weighting": self.weighting,
        }
        groups = {
            name: [p for p in module.parameters() if p.requires_grad]
            for name, module in parts.items()
        }
        direct = [p for p in self.student.parameters(recurse=False) if p.requires_grad]
        if direct:
            groups["student"] = direct
        return {name: params for name, params in groups.items() if params}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The student's parameters that every task reaches (for gradient-based weightings)."""
        return list(self.student.shared_parameters())  # type: ignore[operator]
