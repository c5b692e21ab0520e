"""DiSparse's phases: score and prune the student per task, then train the sparse network.

A role (the baseline or the student) whose network is ``dense.sharing.name=disparse``
(:class:`~unirep.models.pruning.DiSparseNet`) trains, by ``mode``:

- ``static``: one phase, ``<role>``; before its first step the freshly initialised network (the
  initialisation every role shares) is scored on ``num_batches`` training batches, per task,
  and pruned by the unanimous rule;
- ``pretrained``: ``<role>-dense`` trains the dense network, which is then scored and pruned;
  ``<role>`` fine-tunes the pruned network from those weights with the same schedule;
- ``dynamic``: one phase, ``<role>``, from random ERK masks, the masks updated every
  ``interval`` steps by the trainer (:meth:`~unirep.models.pruning.DiSparseNet.after_update`).

The scoring batches come from their own sampler (the phase's data order is untouched), the
global random state and the batch-norm statistics are restored after scoring, and the scores are
summed over processes, so every process prunes the same weights. A resumed phase reloads its
masks with its checkpoint. What was pruned (target and real densities, per layer, and the
per-layer IoU of the tasks' keep masks) is ``pruning/<role>.json``, ``summary.sharing`` in
``metrics.json`` and the report's "What the tasks share" section and ``pruning.png``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

import unirep.layout as layout
from unirep.batch import Batch, make_batch
from unirep.data.sampling import MultiDomainStream
from unirep.models.pruning import DiSparseNet, reduce_sums
from unirep.pipeline.rundir import stored

SCORING_SEED = 7919  # the scoring sampler's seed offset from the run seed


def prune_and_train(
    run: Any,
    trained: Any,
    role: str,
    teacher_val: Any,
    arch: dict[str, Any],
    fit_network: Callable[..., Any],
) -> Any:
    """Train ``role``'s DiSparse network (see the module) with ``fit_network(run, trained,
    role, teacher_val, arch, name, prepare=...)``; returns the role's (last) phase."""
    mode = arch.get("sharing_kwargs", {}).get("mode", "static")
    source = None
    if mode == "pretrained":
        source = fit_network(run, trained, role, teacher_val, arch, f"{role}-dense").module.student

    def prepare(phase: Any) -> None:
        net: DiSparseNet = phase.module.student
        if mode == "dynamic":
            net.erk_start()
            return
        if source is not None:
            net.load_state_dict(source.state_dict())
        net.decide(scored_gradients(net, phase, run.accelerator))

    phase = fit_network(run, trained, role, teacher_val, arch, role, prepare=prepare)
    net = phase.module.student
    record = stored(run.run_dir / layout.PRUNING / f"{role}.json", run.accelerator, net.record)
    trained.stages[role] = [record]
    return phase


def scored_gradients(
    net: DiSparseNet, phase: Any, accelerator: Accelerator
) -> dict[str, dict[str, Tensor]]:
    """Each task's ``Σ_b |∂L_t/∂w|`` over ``net.num_batches`` training batches of ``phase``
    drawn by a sampler of their own, summed over processes; the global random state is kept."""
    module = phase.module
    with torch.random.fork_rng(devices=[]):
        batches = scoring_batches(phase, accelerator, net.num_batches)
        sums = net.importance(batches, module.supervised_losses)
    return reduce_sums(sums, accelerator)


def scoring_batches(phase: Any, accelerator: Accelerator, count: int) -> Iterator[Batch]:
    """``count`` training batches of ``phase`` on the device, from a sampler seeded apart from
    the phase's own (whose data order stays that of every other role)."""
    stream = MultiDomainStream(
        phase.train_sets,
        phase.batch_sizes,
        seed=phase.seed + SCORING_SEED,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        draws=phase.draws,
    )
    for _ in range(count):
        yield make_batch(next(stream), phase.tasks).to(accelerator.device)
