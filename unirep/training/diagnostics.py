"""Task-balance diagnostics on the shared parameters: who drives each shared layer, and do the
tasks' gradients agree.

Every ``train.diagnostics_every`` optimizer steps (0: off; a phase with one task has nothing to
compare), on the step's last micro-batch, :class:`TaskDiagnostics` takes each task's gradient of
the shared parameters (one extra backward per task, graphs kept, averaged over processes) and,
after the update, logs:

- ``gradcos/<a>~<b>``: the cosine between two tasks' shared gradients (gradient weightings log it
  on every step already; theirs is kept);
- ``dominance/<layer>/<task>``: AdaTask's relative accumulated update (Yang et al., AAAI 2023,
  §"Analysis": ``AU_{i,t} = β AU_{i,t−1} + (1 − β)‖Δ_i θ‖²`` per shared layer, ``rAU_i = AU_i /
  Σ_k AU_k``). ``Δ_i θ`` is the part of the step attributable to task ``i``: its effective weight
  (``weight/<i>`` as the weighting logged it; 1 when it logs none) times its gradient, divided by
  the optimizer's per-parameter denominator where it has one (``√v̂ + ε`` for Adam / AdamW and for
  each task of AdaTask, ``√v + ε`` for RMSProp, ``√G + ε`` for AdaGrad; 1 for SGD). The learning
  rate is common to all tasks and cancels. A layer is *dominated* when one task's rAU is near 1.

A layer is a module of the shared trunk that owns a weight with two or more dimensions (a
convolution or a linear map) and its other parameters (bias). The EMA state ``AU`` is a buffer of
the trainable module (checkpointed: a resumed run logs what the uninterrupted one logs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from unirep.losses.bundle import LossBundle


def shared_layers(named: list[tuple[str, nn.Parameter]]) -> dict[str, list[int]]:
    """``{layer: [indices into named]}``: parameters grouped by owning module, only modules that
    own a weight of two or more dimensions."""
    by_module: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(named):
        by_module.setdefault(name.rpartition(".")[0] or name, []).append(i)
    return {
        layer: idx for layer, idx in by_module.items() if any(named[i][1].dim() >= 2 for i in idx)
    }


class TaskDiagnostics(nn.Module):
    """Per-task gradient cosines and per-layer task dominance of the shared parameters.

    Args:
        tasks: the phase's tasks, in order.
        named_shared: ``(name, parameter)`` of the shared trunk (names relative to it).
        every: optimizer steps between two measurements.
        beta: the EMA factor of ``AU`` (0.9).

    State: ``au`` (``[L, T]`` float64, one row per layer) and ``seen`` (whether ``au`` holds a
    measurement yet).
    """

    au: Tensor
    seen: Tensor

    def __init__(
        self,
        tasks: list[str],
        named_shared: list[tuple[str, nn.Parameter]],
        every: int,
        beta: float = 0.9,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.every = int(every)
        self.beta = float(beta)
        self.names = [n for n, _ in named_shared]
        self.layers = shared_layers(named_shared)
        self.register_buffer(
            "au", torch.zeros(len(self.layers), len(self.tasks), dtype=torch.float64)
        )
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is measured."""
        return self.every > 0 and len(self.tasks) > 1 and (step + 1) % self.every == 0

    def gradients(
        self, bundle: LossBundle, shared: list[nn.Parameter], accelerator: Any
    ) -> list[list[Tensor | None]]:
        """Each task's gradient of each shared parameter (``[T][n_params]``, float32, averaged
        over processes, ``None`` where the task's loss does not reach it), graphs kept."""
        losses = bundle.task_losses()
        out: list[list[Tensor | None]] = []
        for task in self.tasks:
            loss = losses.get(task)
            if loss is None or not loss.requires_grad:
                out.append([None] * len(shared))
                continue
            grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            out.append([None if g is None else g.detach().float() for g in grads])
        if accelerator.num_processes > 1:  # every process must take part, present or not
            flat = torch.stack([_flat(row, shared) for row in out])
            flat = accelerator.reduce(flat, "mean")
            out = []
            for row in flat:
                parts, offset = [], 0
                for p in shared:
                    parts.append(row[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
                out.append(parts)
        return out

    def measure(
        self,
        grads: list[list[Tensor | None]],
        shared: list[nn.Parameter],
        weights: dict[str, Any],
        optimizer: Any,
    ) -> dict[str, float]:
        """The logs of one measurement (after the optimizer step, whose state it reads)."""
        torch_opt = getattr(optimizer, "optimizer", optimizer)
        state = getattr(torch_opt, "state", {})
        group_of = {id(p): g for g in getattr(torch_opt, "param_groups", []) for p in g["params"]}
        rule = getattr(torch_opt, "base", None)  # AdaTask's base rule
        w = [float(weights.get(f"weight/{t}", 1.0)) for t in self.tasks]
        energy = torch.zeros(len(self.layers), len(self.tasks), dtype=torch.float64)
        for row, (_layer, idx) in enumerate(self.layers.items()):
            for i in idx:
                p = shared[i]
                denom = _denominator(state.get(p, {}), group_of.get(id(p), {}), rule)
                for k in range(len(self.tasks)):
                    g = grads[k][i]
                    if g is None:
                        continue
                    d = denom if denom is None or denom.dim() == g.dim() else denom[k]
                    step = w[k] * (g if d is None else g / d)
                    energy[row, k] += float(step.double().pow(2).sum())
        if bool(self.seen):
            self.au.mul_(self.beta).add_(energy.to(self.au.device), alpha=1 - self.beta)
        else:
            self.au.copy_(energy)
            self.seen.fill_(True)
        total = self.au.sum(1, keepdim=True)
        rau = torch.where(total > 0, self.au / total.clamp_min(1e-300), torch.zeros_like(self.au))
        logs: dict[str, float] = {}
        for row, layer in enumerate(self.layers):
            for k, task in enumerate(self.tasks):
                logs[f"dominance/{layer}/{task}"] = float(rau[row, k])
        flat = [_flat(row, shared) for row in grads]
        norms = [float(f.norm()) for f in flat]
        for a in range(len(self.tasks)):
            for b in range(a + 1, len(self.tasks)):
                den = norms[a] * norms[b]
                cos = float(flat[a] @ flat[b]) / den if den > 0 else 0.0
                logs[f"gradcos/{self.tasks[a]}~{self.tasks[b]}"] = cos
        return logs


def _flat(row: list[Tensor | None], shared: list[nn.Parameter]) -> Tensor:
    """One task's gradients as ``[n]`` float32 (zeros where ``None``)."""
    parts = [
        (torch.zeros_like(p, dtype=torch.float32) if g is None else g).reshape(-1)
        for p, g in zip(shared, row, strict=True)
    ]
    return torch.cat(parts)


def _denominator(state: dict[str, Any], group: dict[str, Any], rule: str | None) -> Tensor | None:
    """The optimizer's per-coordinate step denominator (``None``: plain SGD); AdaTask's has one
    row per task."""
    eps = float(group.get("eps", 1e-8))
    if "exp_avg_sq" in state:  # Adam, AdamW, AdaTask (its rmsprop / adagrad keep it too)
        v = state["exp_avg_sq"].float()
        if rule in ("rmsprop", "adagrad"):
            return v.sqrt() + eps
        step = float(state.get("step", 1))
        beta2 = float(group.get("betas", (0.9, 0.999))[1])
        return (v / (1 - beta2**step)).sqrt() + eps
    if "square_avg" in state:  # RMSprop
        return state["square_avg"].float().sqrt() + eps
    if "sum" in state:  # Adagrad
        return state["sum"].float().sqrt() + eps
    return None
