"""``alternating``: one optimizer step per task group on each batch, groups drawn at random.

Pascal, Michiardi, Bost, Huet & Zuluaga, "Improved optimization strategies for deep Multi-Task
Networks" (arXiv 2109.11678), MTL-IUS ("independent update steps"; authors' code
``lucaspascal/AITSO_MTL``): instead of one step on the summed loss, the tasks are split once, at
random, into disjoint groups; on every batch each group in turn does forward → backward of its
tasks' summed losses → optimizer step, seeing the parameters the previous group just updated.
``group_size = T`` is the plain ``sum``; ``group_size = 1`` alternates task by task.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from unirep.losses.bundle import LossBundle
from unirep.weighting.base import WEIGHTINGS, Weighting


@WEIGHTINGS.register("alternating")
class AlternatingWeighting(Weighting):
    """Random disjoint task groups of ``group_size`` tasks (the last may be smaller), each
    updated by its own optimizer step on every batch.

    The trainer asks :meth:`update_groups` and runs one forward, one :meth:`backward` of the
    group's ``Σ_{t ∈ group} L_t`` and one checked optimizer step per group, in a fixed order; the
    joint terms (which belong to no task) go with the first group. Parameters only the other
    groups' tasks reach get no gradient, so the optimizer leaves them (and their moments)
    untouched, as in the reference; under DDP the run's ``Accelerator`` is told that a step may
    leave parameters unused (:attr:`leaves_parameters_unused`). One optimizer (MTL-IUS): the
    moment estimates are shared by the groups. The learning-rate schedule advances once per batch
    (a step of the run), not once per group.

    Pitfall (the paper's): the number of steps per batch grows with the number of groups, so
    lower the learning rate; BatchNorm statistics move once per group's forward.

    Args:
        tasks: task names, in the run's order.
        group_size: tasks per group (1 to T).
        seed: draws the grouping (the permutation is a buffer: checkpointed, the same on every
            process).
    """

    leaves_parameters_unused = True
    order: Tensor

    def __init__(self, tasks: list[str], group_size: int = 1, seed: int = 0) -> None:
        super().__init__(tasks)
        if not isinstance(group_size, int) or not 1 <= group_size <= len(self.tasks):
            raise ValueError(
                f"alternating group_size must be an integer from 1 to {len(self.tasks)} (the "
                f"number of tasks), got {group_size!r}"
            )
        self.group_size = group_size
        gen = torch.Generator().manual_seed(int(seed))
        self.register_buffer("order", torch.randperm(len(self.tasks), generator=gen))

    def update_groups(self) -> list[list[str] | None]:
        order = [self.tasks[i] for i in self.order.tolist()]
        return [order[i : i + self.group_size] for i in range(0, len(order), self.group_size)]

    def backward(
        self, bundle: LossBundle, shared: list[nn.Parameter], accelerator: Any
    ) -> dict[str, float]:
        terms = [*bundle.task_losses().values()]
        joint = bundle.joint_loss()
        if joint is not None:
            terms.append(joint)
        if terms:  # a group with no labelled task in the batch makes no step
            accelerator.backward(sum(terms[1:], terms[0]))
        return {}
