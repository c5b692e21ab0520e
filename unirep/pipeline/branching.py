"""AutoMTL's two phases: search the branching, then retrain the architecture it chose.

A role (the baseline or the student) whose network is ``dense.sharing.name=automtl`` trains:

1. ``<role>-search``: the supernet (:class:`~unirep.models.automtl.AutoMTLNet` without
   ``choices``), its policy trained with the network under the sharing cost, selected on
   validation with each task's most probable choices (``checkpoints/<role>-search/``);
2. the branching it chose (each convolution's choice per task, with the policy's
   probabilities and what the fixed network keeps) is written to ``branching/<role>.json``
   (read back on resume);
3. ``<role>``: that fixed network, trained from the start (same seed, same data order) like any
   student: it is what the role evaluates, exports and reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import unirep.layout as layout
from unirep.models.build import count_parameters
from unirep.pipeline.rundir import stored


def search_then_retrain(
    run: Any,
    trained: Any,
    role: str,
    teacher_val: Any,
    arch: dict[str, Any],
    fit_network: Callable[..., Any],
) -> Any:
    """Search ``role``'s branching, then train the chosen network (see the module) with
    ``fit_network(run, trained, role, teacher_val, arch, name)``; returns the second phase and
    records the search in ``trained.stages[role]``."""
    search = fit_network(run, trained, role, teacher_val, arch, f"{role}-search")
    supernet = search.module.student
    path = run.run_dir / layout.BRANCHING / f"{role}.json"
    record = stored(path, run.accelerator, lambda: branching_record(supernet))
    fixed = {**arch, "sharing_kwargs": {**arch.get("sharing_kwargs", {}),
                                        "choices": record["choices"]}}  # fmt: skip
    phase = fit_network(run, trained, role, teacher_val, fixed, role)
    trained.stages[role] = [record]
    return phase


def branching_record(supernet: Any) -> dict[str, Any]:
    """What the search chose: ``layers`` (the encoder's convolutions, in order), ``choices``
    (``{layer: {task: "shared" | "specific" | "skip"}}``), the policy's ``probabilities``
    (``[layer][task][choice]``) and the supernet's parameter count."""
    return {
        "layers": list(supernet.layer_names),
        "choices": supernet.fixed_choices(),
        "probabilities": supernet.probabilities().detach().cpu().tolist(),
        "supernet_params": count_parameters(supernet),
    }
