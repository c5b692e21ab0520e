"""The seam between per-task losses and the update: a weighting turns a LossBundle into gradients.

Every weighting is an ``nn.Module`` whose state lives in parameters or buffers, so the trainer
optimises it (it sits inside the phase's trainable module), wraps it for DDP with the rest,
checkpoints and resumes it. The loop calls one method, :meth:`Weighting.backward`, and never
branches on a method name.

Two families:

- loss-based (:class:`LossWeighting`): combine the per-task losses into one scalar and call
  ``accelerator.backward`` on it (``sum``, ``mean``, ``uncertainty``);
- gradient-based: take per-task gradients of the shared parameters, combine them, and write the
  result into ``.grad`` (``pcgrad``).
"""

from __future__ import annotations

import abc
from typing import Any

from torch import Tensor, nn

from unirep.losses.bundle import LossBundle
from unirep.registry import Registry

WEIGHTINGS: Registry[Weighting] = Registry("weighting")
"""``WEIGHTINGS.build(name, tasks=[...], **kwargs)``; config key ``weighting: {name, kwargs}``."""


class Weighting(nn.Module, abc.ABC):
    """Turns a :class:`LossBundle` into gradients on every trainable parameter.

    The loop's whole contract with a method (it never asks which method it holds):

    - :meth:`backward` once per micro-batch;
    - :meth:`update_groups`: the task groups updated one after the other on the same batch, one
      optimizer step each (``[None]``: one step with every task; ``alternating`` splits them);
    - :meth:`after_step` after each optimizer step, with the task losses recomputed on the same
      batch when :attr:`wants_losses_after_step` (FAMO);
    - :meth:`optimized_parameters`: the state the run's optimizer trains (e.g. log-variances);
      state a method updates itself (FAMO's logits) stays out of it.
    - :meth:`bind_shared` once, when the trainable module is built (state shaped like the shared
      parameters).

    Args:
        tasks: the task names of the phase, in the run's order (a weighting may keep one state
            entry per task, e.g. a log-variance).
    """

    wants_losses_after_step: bool = False
    leaves_parameters_unused: bool = False  # a step may not reach every parameter (DDP must know)

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)

    @abc.abstractmethod
    def backward(
        self, bundle: LossBundle, shared: list[nn.Parameter], accelerator: Any
    ) -> dict[str, float]:
        """Accumulate this micro-batch's gradients into ``.grad`` of every trainable parameter.

        Args:
            bundle: the objective's losses (graphs kept).
            shared: the parameters every task uses (the student's encoder / backbone), for
                gradient-based methods; loss-based methods ignore it.
            accelerator: the run's ``Accelerator``: its ``backward`` (loss scaling, gradient
                accumulation) must be used for the final backward pass, and ``reduce`` for any
                cross-process average.

        Returns:
            Scalars for the training log, e.g. ``weight/<task>`` (effective task weights) or
            ``gradcos/<a>~<b>`` (cosine between two tasks' shared gradients).
        """

    def update_groups(self) -> list[list[str] | None]:
        """Task groups to update one after the other on each batch (``[None]``: all at once)."""
        return [None]

    def after_step(self, task_losses: dict[str, Tensor], accelerator: Any) -> None:
        """Called after each optimizer step; ``task_losses`` are the losses recomputed on the
        step's (last) micro-batch with the updated weights when :attr:`wants_losses_after_step`,
        else empty."""

    def optimized_parameters(self) -> list[nn.Parameter]:
        """The parameters the run's optimizer trains (default: every one that requires grad)."""
        return [p for p in self.parameters() if p.requires_grad]

    def bind_shared(self, shared: list[nn.Parameter]) -> None:
        """Called once with the shared parameters when the trainable module is built, before any
        checkpoint is loaded: a method whose state is shaped like them (DB-MTL's gradient EMA)
        sizes it here, so that a checkpoint's state fits. Default: nothing."""


class LossWeighting(Weighting):
    """A weighting that only rescales losses: one scalar, one ``accelerator.backward``."""

    @abc.abstractmethod
    def combine(self, bundle: LossBundle, accelerator: Any = None) -> Tensor:
        """The scalar to back-propagate. ``accelerator`` (None in unit tests of the formula)
        gives stateful methods ``reduce``, so that every process keeps the same state."""

    def weights(self) -> dict[str, float]:
        """Effective weight of each task's loss (logged as ``weight/<task>``)."""
        return {}

    def backward(
        self, bundle: LossBundle, shared: list[nn.Parameter], accelerator: Any
    ) -> dict[str, float]:
        accelerator.backward(self.combine(bundle, accelerator))
        return {f"weight/{t}": w for t, w in self.weights().items()}


def process_mean(values: Tensor, accelerator: Any) -> Tensor:
    """``values`` averaged over processes (as is with one process or no accelerator)."""
    if accelerator is None or getattr(accelerator, "num_processes", 1) <= 1:
        return values
    return accelerator.reduce(values.contiguous(), "mean")
