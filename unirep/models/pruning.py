"""DiSparse: per-task pruning of a multi-task network (Sun et al., "DiSparse: Disentangled
Sparsification for Multitask Model Compression", CVPR 2022; reference code
``SHI-Labs/DiSparse-Multitask-Model-Compression``, ``prune_utils.py`` and ``dynamic_prune.py``).

The importance of every prunable weight (every convolution and linear weight) is measured **per
task**, on the part of the network that task's loss reaches (the shared encoder, its own decoder
and head), with that task's loss only, and normalised by the task's total. Each task keeps its
top ``1 − sparsity`` share; a shared weight is pruned only when **every** task prunes it (the
unanimous rule: the shared mask is the union of the tasks' keep masks), a task's own weights
follow its own mask. The union makes the shared part denser than the target: the record gives
the real density (the reference prints it; users forget it).

Three ways to get the masks (``mode``):

- ``static`` (SNIP-like, at initialisation): ``s_t = |w| · Σ_b |∂L_t/∂w|`` over ``num_batches``
  training batches, the reference's ``|∂L_t/∂c|`` for an all-ones mask ``c`` multiplied into the
  weights (the reference re-draws the weights with Xavier-normal before scoring; we score the
  network's own initialisation, the one it then trains from);
- ``pretrained``: ``s_t = w² · Σ_b |∂L_t/∂w|`` on a trained dense network, then fine-tuned;
- ``dynamic`` (RigL-style prune and regrow): ERK densities (Evci et al., 2020) with random
  masks at the start (the first convolution stays dense, as in the reference); every
  ``interval`` optimizer steps until ``end`` (a fraction of the phase), each layer is
  magnitude-pruned to ``d_l · (1 − r)`` with the prune rate ``r`` cosine-decayed from
  ``prune_rate`` to 0, then each task regrows its ``d_l · r`` share of the pruned weights with
  the largest ``|∂L_t/∂w|`` (the dense gradient), the shared layers taking the union of the
  tasks' regrowth.

Pruned weights are held at exactly zero: their gradients are masked (as the reference's
``weight_orig · mask`` does, so gradient weightings and clipping see what the reference sees)
and the masks are applied again after every optimizer step. The masks are buffers, so they are
checkpointed (a resume is bit-exact) and every process of a distributed run holds the same ones
(their scores are summed over processes before the decision).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from unirep.models.dense import DenseMultiTaskNet, build_dense_from_architecture

MODES = ("static", "pretrained", "dynamic")


def check_disparse_arguments(
    mode: str = "static",
    sparsity: float = 0.9,
    num_batches: int = 10,
    interval: int = 50,
    end: float = 0.75,
    prune_rate: float = 0.5,
    erk_power_scale: float = 1.0,
    seed: int = 0,
) -> None:
    """Raise ``ValueError`` naming the argument for a DiSparse setting that cannot be built."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"sparsity (the share of weights pruned) must be in [0, 1), got {sparsity}"
        )
    if int(num_batches) < 1:
        raise ValueError(f"num_batches (scoring batches) must be >= 1, got {num_batches}")
    if int(interval) < 1:
        raise ValueError(f"interval (steps between mask updates) must be >= 1, got {interval}")
    if not 0.0 < end <= 1.0:
        raise ValueError(
            f"end (the share of the phase with mask updates) must be in (0, 1], got {end}"
        )
    if not 0.0 <= prune_rate < 1.0:
        raise ValueError(f"prune_rate must be in [0, 1), got {prune_rate}")
    if not erk_power_scale > 0:
        raise ValueError(f"erk_power_scale must be > 0, got {erk_power_scale}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def weight_owners(net: nn.Module, tasks: Iterable[str]) -> dict[str, str | None]:
    """``{weight name: owning task, or None when shared}`` for every ``Conv2d`` / ``Linear``
    weight of ``net`` in module order. A weight belongs to task ``t`` when a module on its path is
    named ``t`` (``decoders.<t>``, ``heads.<t>``); every other weight is shared."""
    names = set(tasks)
    owners: dict[str, str | None] = {}
    for module_name, module in net.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            owner = next((p for p in module_name.split(".") if p in names), None)
            owners[f"{module_name}.weight" if module_name else "weight"] = owner
    return owners


def reachable(owners: dict[str, str | None], task: str) -> list[str]:
    """The weights ``task``'s loss reaches: the shared ones and its own, in module order."""
    return [n for n, o in owners.items() if o is None or o == task]


def normalised_keep(scores: dict[str, Tensor], keep_ratio: float) -> dict[str, Tensor]:
    """One task's keep masks: its scores over every weight it reaches, normalised by their sum,
    keeping the top ``keep_ratio`` share (at least one weight; ties at the threshold are kept, as
    in the reference's ``>=``). ``{name: score tensor}`` -> ``{name: bool tensor}``."""
    flat = torch.cat([s.flatten() for s in scores.values()]).double()
    total = flat.sum()
    norm = flat / total if total > 0 else torch.full_like(flat, 1.0 / flat.numel())
    k = max(1, int(flat.numel() * keep_ratio))
    threshold = torch.topk(norm, k, sorted=True).values[-1]
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = (norm[start : start + s.numel()] >= threshold).view_as(s)
        start += s.numel()
    return masks


def unanimous_masks(
    scores: dict[str, dict[str, Tensor]], owners: dict[str, str | None], keep_ratio: float
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """DiSparse's decision: ``scores`` is ``{task: {weight: importance}}`` over the weights each
    task reaches. Returns (``{weight: bool mask}``: a shared weight kept when any task keeps it,
    a task's own weight by that task's mask; ``{task: {weight: its keep mask}}``)."""
    keep = {t: normalised_keep(s, keep_ratio) for t, s in scores.items()}
    masks: dict[str, Tensor] = {}
    for name, owner in owners.items():
        if owner is None:
            found = [keep[t][name] for t in keep if name in keep[t]]
            masks[name] = torch.stack(found).any(0) if found else torch.ones(())
        else:
            masks[name] = keep[owner][name]
    return masks, keep


def mask_iou(keep: dict[str, dict[str, Tensor]], owners: dict[str, str | None]) -> dict[str, Any]:
    """Per shared layer, how alike the tasks' keep masks are (DiSparse's "watershed" analysis,
    ``iou_analysis.py``): ``{"layers": [...], "iou": [|∩_t K_t| / |∪_t K_t|], "pairwise":
    [mean over task pairs of |K_u ∩ K_v| / |K_u ∪ K_v|]}`` (1 where nothing is kept)."""
    tasks = list(keep)
    layers, iou, pairwise = [], [], []
    for name, owner in owners.items():
        if owner is not None or not all(name in keep[t] for t in tasks):
            continue
        stack = torch.stack([keep[t][name] for t in tasks])
        union = int(stack.any(0).sum())
        iou.append(int(stack.all(0).sum()) / union if union else 1.0)
        pairs = []
        for i in range(len(tasks)):
            for j in range(i + 1, len(tasks)):
                u = int((stack[i] | stack[j]).sum())
                pairs.append(int((stack[i] & stack[j]).sum()) / u if u else 1.0)
        pairwise.append(sum(pairs) / len(pairs) if pairs else 1.0)
        layers.append(name.removesuffix(".weight"))
    return {"layers": layers, "iou": iou, "pairwise": pairwise}


def erk_densities(
    shapes: dict[str, torch.Size], density: float, power_scale: float = 1.0
) -> dict[str, float]:
    """Erdős–Rényi-kernel layer densities with the overall density ``density`` (RigL; the
    reference's ``googleAI_ERK``): ``d_l ∝ (Σ shape / Π shape)^power_scale``, layers whose
    density would exceed 1 made dense and the rest rescaled."""
    dense: set[str] = set()
    while True:
        rhs, divisor, raw = 0.0, 0.0, {}
        for name, shape in shapes.items():
            n = math.prod(shape)
            if name in dense:
                rhs -= n * (1 - density)
            else:
                rhs += n * density
                raw[name] = (sum(shape) / n) ** power_scale
                divisor += raw[name] * n
        epsilon = rhs / divisor if divisor > 0 else 0.0
        top = max(raw.values()) if raw else 0.0
        if top * epsilon <= 1 or not raw:
            break
        dense.update(n for n, r in raw.items() if r == top)
    return {n: 1.0 if n in dense else epsilon * raw[n] for n in shapes}


def prune_rate_at(done: int, end_step: int, prune_rate: float) -> float:
    """The cosine-decayed prune rate after ``done`` steps (PyTorch's ``CosineAnnealingLR`` from
    ``prune_rate`` to 0 over ``end_step`` steps, the reference's ``CosineDecay``)."""
    return prune_rate * (1 + math.cos(math.pi * min(done, end_step) / max(1, end_step))) / 2


class DiSparseNet(DenseMultiTaskNet):
    """The dense multi-task student (:class:`~unirep.models.dense.DenseMultiTaskNet`) with
    DiSparse masks on every convolution and linear weight (see the module).

    Args:
        encoder: builds the shared encoder.
        tasks: ``{task: output channels}``.
        mode: ``static``, ``pretrained`` or ``dynamic``.
        sparsity: target share of pruned weights (per task for the static and pretrained modes,
            of every layer together for the dynamic one).
        num_batches: training batches the importance is accumulated over.
        interval, end, prune_rate, erk_power_scale: the dynamic mode's schedule (update every
            ``interval`` steps during the first ``end`` share of the phase, prune rate cosine
            decayed from ``prune_rate``) and ERK's exponent.
        seed: the dynamic mode's random ERK start.

    Forward: as the dense network (pruned weights are zeros). ``masks`` holds one bool buffer per
    prunable weight (``mask.<weight name with '.' as '__'>``).
    """

    def __init__(
        self,
        encoder: Callable[[], nn.Module],
        tasks: dict[str, int],
        decoder_channels: int = 64,
        unit_vector: Iterable[str] = (),
        mode: str = "static",
        sparsity: float = 0.9,
        num_batches: int = 10,
        interval: int = 50,
        end: float = 0.75,
        prune_rate: float = 0.5,
        erk_power_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        check_disparse_arguments(
            mode, sparsity, num_batches, interval, end, prune_rate, erk_power_scale, seed
        )
        super().__init__(encoder(), tasks, decoder_channels, unit_vector=unit_vector)
        self.mode, self.sparsity = mode, float(sparsity)
        self.num_batches, self.interval = int(num_batches), int(interval)
        self.end, self.prune_rate = float(end), float(prune_rate)
        self.erk_power_scale, self.seed = float(erk_power_scale), int(seed)
        self.owners = weight_owners(self, tasks)
        self.masks = nn.Module()
        for name in self.owners:
            weight = self.get_parameter(name)
            self.masks.register_buffer(_key(name), torch.ones_like(weight, dtype=torch.bool))
            weight.register_hook(self._grad_hook(name))
        self.dense_grads = False  # True while measuring the dense gradient (regrowth)
        # the last decision's per-layer IoU of the tasks' keep masks (-1: none yet), kept as
        # buffers so that a resumed run still reports it
        self.shared_layers = [n for n, o in self.owners.items() if o is None]
        empty = torch.full((len(self.shared_layers),), -1.0)
        self.masks.register_buffer("iou_all", empty.clone())
        self.masks.register_buffer("iou_pairwise", empty.clone())

    def _grad_hook(self, name: str) -> Callable[[Tensor], Tensor | None]:
        def hook(grad: Tensor) -> Tensor | None:
            return None if self.dense_grads else grad * self.mask(name)

        return hook

    def mask(self, name: str) -> Tensor:
        """The bool keep mask of the weight ``name``."""
        return self.masks.get_buffer(_key(name))

    def weights(self) -> dict[str, nn.Parameter]:
        """``{name: weight}`` of every prunable weight."""
        return {n: self.get_parameter(n) for n in self.owners}

    @torch.no_grad()
    def set_masks(self, masks: dict[str, Tensor]) -> None:
        """Install ``{weight: bool mask}`` and zero the pruned weights."""
        for name, mask in masks.items():
            self.mask(name).copy_(mask)
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every pruned weight (after an optimizer step, whose momentum may move them)."""
        for name, weight in self.weights().items():
            weight.mul_(self.mask(name))

    # ------------------------------------------------------------------------------------
    # importance and the unanimous decision (static, pretrained)

    def importance(
        self, batches: Iterable[Any], task_losses: Callable[[Any], dict[str, Tensor]]
    ) -> dict[str, dict[str, Tensor]]:
        """``{task: {weight: Σ_b |∂L_t/∂w|}}`` over ``batches`` (``task_losses(batch)`` gives each
        task's loss), the gradient of each task on the weights its loss reaches, one forward per
        batch and one backward per task (the reference runs a forward per task too), dense (no
        mask applied). Batch-norm statistics are restored afterwards."""
        weights = self.weights()
        sums: dict[str, dict[str, Tensor]] = {
            t: {n: torch.zeros_like(weights[n]) for n in reachable(self.owners, t)}
            for t in self.tasks
        }
        saved = {n: b.clone() for n, b in self.named_buffers() if not n.startswith("masks.")}
        self.dense_grads = True
        try:
            for batch in batches:
                losses = task_losses(batch)
                for i, task in enumerate(self.tasks):
                    names = list(sums[task])
                    grads = torch.autograd.grad(
                        losses[task], [weights[n] for n in names],
                        retain_graph=i < len(self.tasks) - 1, allow_unused=True,
                    )  # fmt: skip
                    for n, g in zip(names, grads, strict=True):
                        if g is not None:
                            sums[task][n] += g.abs()
        finally:
            self.dense_grads = False
            with torch.no_grad():  # the scoring forwards leave batch-norm statistics as they were
                for n, b in self.named_buffers():
                    if n in saved:
                        b.copy_(saved[n])
        return sums

    def scores(self, gradient_sums: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
        """DiSparse's importance from the summed gradients: ``|w|·Σ|g|`` (static, SNIP) or
        ``w²·Σ|g|`` (pretrained)."""
        power = 2 if self.mode == "pretrained" else 1
        weights = self.weights()
        return {
            t: {n: weights[n].detach().abs().pow(power) * g for n, g in sums.items()}
            for t, sums in gradient_sums.items()
        }

    def decide(self, gradient_sums: dict[str, dict[str, Tensor]]) -> dict[str, Any]:
        """Prune by the unanimous rule at ``1 − sparsity`` per task; returns the record
        (:meth:`record`)."""
        masks, keep = unanimous_masks(self.scores(gradient_sums), self.owners, 1 - self.sparsity)
        self.set_masks(masks)
        self.remember(keep)
        return self.record()

    # ------------------------------------------------------------------------------------
    # dynamic: ERK start, prune and regrow

    def erk_start(self) -> None:
        """Random masks at the ERK layer densities (the first prunable weight stays dense)."""
        densities = self.layer_densities()
        generator = torch.Generator().manual_seed(self.seed)
        masks = {}
        for name, weight in self.weights().items():
            n = weight.numel()
            keep = round(densities[name] * n)
            order = torch.randperm(n, generator=generator)
            mask = torch.zeros(n, dtype=torch.bool)
            mask[order[:keep]] = True
            masks[name] = mask.view_as(weight).to(weight.device)
        self.set_masks(masks)

    def layer_densities(self) -> dict[str, float]:
        """The dynamic mode's target density per weight (ERK; the first one dense)."""
        shapes = {n: w.shape for n, w in self.weights().items()}
        densities = erk_densities(shapes, 1 - self.sparsity, self.erk_power_scale)
        first = next(iter(shapes))
        return {n: 1.0 if n == first else d for n, d in densities.items()}

    def after_update(
        self,
        done: int,
        total_steps: int,
        losses: Callable[[], dict[str, Tensor]],
        accelerator: Any = None,
    ) -> None:
        """The trainer's call after each optimizer step (``done`` steps of ``total_steps``):
        zero the pruned weights again and, when :meth:`due`, prune and regrow from each task's
        dense gradient on the step's batch (``losses()`` gives its task losses)."""
        if not self.due(done, total_steps):
            self.apply_masks()
            return
        sums = reduce_sums(self.importance([None], lambda _: losses()), accelerator)
        self.prune_and_regrow(done, total_steps, sums)

    def due(self, done: int, total_steps: int) -> bool:
        """Whether the dynamic mode updates its masks after ``done`` optimizer steps."""
        return (
            self.mode == "dynamic"
            and done % self.interval == 0
            and done < self.end_step(total_steps)
        )

    def end_step(self, total_steps: int) -> int:
        return max(1, round(self.end * total_steps))

    @torch.no_grad()
    def prune_and_regrow(
        self, done: int, total_steps: int, gradients: dict[str, dict[str, Tensor]]
    ) -> dict[str, float]:
        """One dynamic update after ``done`` steps with each task's summed absolute dense
        gradient (``{task: {weight: Σ|g|}}``, over the weights it reaches): magnitude-prune each
        layer to ``d_l·(1 − r)``, then each task regrows ``round(d_l·r·n)`` of the pruned weights
        (those just pruned included) by its gradient, shared layers taking the union; regrown
        weights start at zero. Returns ``{"prune_rate", "density"}``."""
        rate = prune_rate_at(done, self.end_step(total_steps), self.prune_rate)
        densities = self.layer_densities()
        weights = self.weights()
        masks, keep_sets = {}, {t: {} for t in self.tasks}
        for name, weight in weights.items():
            mask, n = self.mask(name).clone(), weight.numel()
            target = densities[name]
            if target >= 1.0:
                masks[name] = torch.ones_like(mask)
                for t in self.tasks:
                    if name in gradients.get(t, {}):
                        keep_sets[t][name] = masks[name]
                continue
            keep_n = round(target * (1 - rate) * n)
            active = int(mask.sum())
            if active > keep_n:  # magnitude pruning among the active weights
                magnitude = torch.where(mask, weight.abs(), torch.full_like(weight, -1.0))
                order = torch.topk(magnitude.flatten(), keep_n, sorted=False).indices
                mask = torch.zeros(n, dtype=torch.bool, device=mask.device)
                mask[order] = True
                mask = mask.view_as(weight)
            weight.mul_(mask)  # a regrown weight starts at zero (RigL), even one just pruned
            grow_n = max(0, min(n - int(mask.sum()), round(target * n) - int(mask.sum())))
            grown = torch.zeros_like(mask)
            for t in self.tasks:
                if name not in gradients.get(t, {}):
                    continue
                regrow = torch.zeros_like(mask)
                if grow_n > 0:
                    stat = torch.where(mask, torch.full_like(weight, -1.0), gradients[t][name])
                    regrow.view(-1)[torch.topk(stat.flatten(), grow_n, sorted=False).indices] = True
                keep_sets[t][name] = mask | regrow
                grown |= regrow
            masks[name] = mask | grown
        self.set_masks(masks)
        self.remember(keep_sets)
        return {"prune_rate": rate, "density": self.density()}

    # ------------------------------------------------------------------------------------
    # what it is

    @torch.no_grad()
    def remember(self, keep: dict[str, dict[str, Tensor]]) -> None:
        """Keep the per-layer IoU of the tasks' keep masks ``{task: {weight: mask}}``."""
        iou = mask_iou(keep, self.owners)
        found = dict(zip(iou["layers"], zip(iou["iou"], iou["pairwise"], strict=True), strict=True))
        for i, name in enumerate(self.shared_layers):
            a, p = found.get(name.removesuffix(".weight"), (-1.0, -1.0))
            self.masks.iou_all[i], self.masks.iou_pairwise[i] = a, p

    def density(self, owner: str | bool | None = False) -> float:
        """Share of kept weights: of every prunable weight (default), of the shared ones
        (``None``) or of a task's own (its name)."""
        kept = total = 0
        for name, o in self.owners.items():
            if owner is False or o == owner:
                m = self.mask(name)
                kept, total = kept + int(m.sum()), total + m.numel()
        return kept / total if total else 1.0

    def record(self) -> dict[str, Any]:
        """``metrics.json``'s ``summary.sharing`` and ``pruning/<role>.json``: the target and
        the real densities (overall, shared, per task's own weights, per layer), the kept and
        total prunable weights and the per-layer IoU of the tasks' keep masks."""
        layers = {n.removesuffix(".weight"): self.density_of(n) for n in self.owners}
        kept = sum(int(self.mask(n).sum()) for n in self.owners)
        total = sum(self.mask(n).numel() for n in self.owners)
        record: dict[str, Any] = {
            "name": "disparse",
            "mode": self.mode,
            "target_density": round(1 - self.sparsity, 12),
            "density": kept / total if total else 1.0,
            "shared_density": self.density(None),
            "task_density": {t: self.density(t) for t in self.tasks},
            "kept_weights": kept,
            "prunable_weights": total,
            "layers": layers,
        }
        if bool((self.masks.iou_all >= 0).any()):
            record["iou"] = {
                "layers": [n.removesuffix(".weight") for n in self.shared_layers],
                "iou": [round(float(v), 6) for v in self.masks.iou_all],
                "pairwise": [round(float(v), 6) for v in self.masks.iou_pairwise],
            }
        return record

    def density_of(self, name: str) -> float:
        m = self.mask(name)
        return int(m.sum()) / m.numel()

    def sharing_record(self) -> dict[str, Any]:
        return self.record()

    def exported(self, architecture: dict[str, Any]) -> tuple[dict[str, Any], nn.Module]:
        """The plain dense network with the pruned weights at zero (no masks): its export
        stores the mostly-zero weights packed (:func:`unirep.io.pack_sparse`)."""
        record = {k: v for k, v in architecture.items() if not k.startswith("sharing")}
        net = build_dense_from_architecture(
            record, dict(self.task_channels), unit_vector=self.unit_vector
        )
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("masks.")}
        net.load_state_dict(state, strict=True)
        net.to(next(self.parameters()).device).train(self.training)
        return record, net


def reduce_sums(
    sums: dict[str, dict[str, Tensor]], accelerator: Any
) -> dict[str, dict[str, Tensor]]:
    """``{task: {weight: tensor}}`` summed over the processes of ``accelerator`` (unchanged on
    one process or without one)."""
    if accelerator is None or accelerator.num_processes == 1:
        return sums
    return {
        t: {n: accelerator.reduce(g.contiguous(), "sum") for n, g in grads.items()}
        for t, grads in sums.items()
    }


def _key(name: str) -> str:
    return name.replace(".", "__")
