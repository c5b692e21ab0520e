"""The per-task gradients' Gramian without the ``[T, P]`` Jacobian: torchjd's autogram engine.

A gradient method whose weights depend on the Gramian ``G = J Jᵀ`` alone (``[T, T]``, ``J`` the
per-task gradients of the shared parameters) does not need ``J``: torchjd's
:class:`torchjd.autogram.Engine` (Quinton & Rey, "Jacobian Descent for Multi-Objective
Optimization", 2024, §6) hooks the trunk's modules during the forward and, in one backward
vectorised over the ``T`` losses, sums each module's ``[T, p_module]`` Jacobian's Gramian into
``G`` and drops that Jacobian at once: the largest buffer is ``T`` times the largest module's
parameters (and ``T`` copies of the activation gradients in flight), not ``T`` times all of them.

:class:`TrunkGramian` is one forward's engine: :class:`~unirep.training.trainable.
TrainableModule` makes it before the student's forward when the weighting asks
(:meth:`~unirep.weighting.GradientWeighting.gramian_engine`), removes its forward hooks right
after (the nodes it put in the graph stay there; outside :meth:`gramian` they pass gradients
through unchanged), and the bundle carries it to the weighting's backward. A fresh engine per
forward means no state survives a forward that never reaches a backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TrunkGramian:
    """The autogram engine of one forward through ``trunk`` (``batch_dim=None``: the task
    losses are batch means, so the engine differentiates the ``[T]`` vector of losses itself;
    BatchNorm and any other module are then allowed).

    Args:
        trunk: the shared module; the Gramian is taken with respect to every parameter of it
            that requires a gradient (:attr:`parameters`).
    """

    def __init__(self, trunk: nn.Module) -> None:
        from torchjd.autogram import Engine

        self.parameters = [p for p in trunk.parameters() if p.requires_grad]
        self._engine = Engine(trunk, batch_dim=None)

    def release(self) -> None:
        """Remove the engine's forward hooks (after the forward they were made for). torchjd
        0.18 keeps them on its private ``ModuleHookManager``; its finaliser removes them once."""
        self._engine._module_hook_manager._finalizer()

    def gramian(self, losses: list[Tensor | None], scale: float = 1.0) -> Tensor:
        """``G`` (``[T, T]``, float32 or wider) of the ``T`` losses' gradients with respect to
        :attr:`parameters` (a loss that is ``None`` or has no graph: a zero row and column),
        computed on the losses times ``scale`` (an fp16 loss scale: no underflow) and divided
        by ``scale²``."""
        graph = [loss for loss in losses if loss is not None and loss.requires_grad]
        if not graph:
            return torch.zeros(len(losses), len(losses))
        ref = graph[0]
        rows = [
            loss.reshape(()) * scale
            if loss is not None and loss.requires_grad
            else torch.zeros((), device=ref.device, dtype=ref.dtype)
            for loss in losses
        ]
        gramian = self._engine.compute_gramian(torch.stack(rows))
        return gramian.to(torch.promote_types(gramian.dtype, torch.float32)) / scale**2
