"""``static``: fixed per-task weights given by the user (a hand-tuned or grid-searched baseline)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from unirep.losses.bundle import LossBundle
from unirep.weighting.base import WEIGHTINGS, LossWeighting
from unirep.weighting.loss_stats import add_terms, checked_task_losses, finite_float


@WEIGHTINGS.register("static")
class StaticWeighting(LossWeighting):
    """``L = Σ_{t in batch} w_t·L_t + Σ_j J_j`` with constant ``w_t`` from the config.

    ``weights`` maps task names to non-negative finite numbers; a task of the run it does not name
    gets 1.0, and a name that is not a task of the run is a ValueError naming it and the valid
    tasks (a typo must not silently leave a task at 1). No state: the weights are configuration.

    Args:
        tasks: task names, in the run's order.
        weights: ``{task: w_t}``; in YAML
            ``weighting: {name: static, kwargs: {weights: {seg: 2.0}}}``.

    Shapes: every loss term is a scalar; the result is a scalar.
    """

    def __init__(self, tasks: list[str], weights: dict[str, float] | None = None) -> None:
        super().__init__(tasks)
        given = {} if weights is None else weights
        if not isinstance(given, dict):
            raise ValueError(f"weights must map task names to numbers, got {given!r}")
        unknown = sorted(str(t) for t in given if t not in self.tasks)
        if unknown:
            raise ValueError(
                f"static weights name unknown tasks {unknown}; valid tasks: {self.tasks}"
            )
        self._weights = {
            t: finite_float(f"weights[{t!r}]", given.get(t, 1.0), low=0.0) for t in self.tasks
        }

    def combine(self, bundle: LossBundle, accelerator: Any = None) -> Tensor:
        losses = checked_task_losses(bundle, self.tasks)
        terms = [self._weights[t] * loss for t, loss in losses.items()]
        return add_terms(terms, bundle.joint_loss())

    def weights(self) -> dict[str, float]:
        return dict(self._weights)
