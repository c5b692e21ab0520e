"""The pruned auxiliary network: per-task subnetworks pruned from a network learnt on the union
of the tasks' classes.

Multi-task learning with partially overlapping label sets (the abstract in
``shared/seeds/abstracts.txt``, line 37; its paper and code were not found, so the choices
below are ours): a large **auxiliary task** whose classes cover every task's is learnt first;
each small task's network is then the auxiliary network with some of its hidden units pruned,
chosen from that task's labelled samples, and the tasks are learnt jointly through their pruned
networks, which keep sharing every weight.

- Hidden units (:func:`hidden_layers`): the output channels of every block of the backbone's
  ``stages`` (timm's convention; the decathlon ResNets' basic blocks) and the pooled feature.
- Importance (:func:`taylor_importance`): the first-order Taylor estimate of how much a unit
  matters to the task (Molchanov et al., "Importance estimation for neural network pruning",
  CVPR 2019), with the task's own objective: ``I_c = mean_n |Σ_hw a_nchw · ∂ log p(y_n | x_n,
  C_t) / ∂a_nchw|``, where ``p(· | x, C_t)`` is the auxiliary head's softmax restricted to the
  task's classes ``C_t`` (its union labels) and ``y_n`` the sample's label. A unit that only
  other tasks' classes read has zero importance for the task.
- Masks (:func:`keep_masks`): per task and layer, the ``max(1, round(keep · C_l))`` most
  important units (ties: the lower index).

:class:`PrunedAuxiliaryNet` is the joint network: one backbone, a mask table (a buffer, exported
with the student), one head per task and, while training, the auxiliary head (its loss is a
joint term, :class:`unirep.pipeline.overlap.AuxiliaryLoss`). The two phases around it are in
:mod:`unirep.pipeline.overlap`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.models.network import MultiDomainNet

FEATURE = "feature"
"""The pooled feature's layer name (the backbone's output ``[B, C]``)."""


def hidden_layers(backbone: nn.Module) -> dict[str, nn.Module]:
    """``{layer name: module}`` whose outputs' channels are the prunable hidden units: each
    block of ``backbone.stages`` (``"stages.<i>.<j>"``) when it has them, then the backbone
    itself (:data:`FEATURE`, its pooled ``[B, C]`` output)."""
    layers: dict[str, nn.Module] = {}
    stages = getattr(backbone, "stages", None)
    if isinstance(stages, nn.Sequential):
        for i, stage in enumerate(stages):
            blocks = list(stage) if isinstance(stage, nn.Sequential) else [stage]
            for j, block in enumerate(blocks):
                if _width(block) is not None:
                    layers[f"stages.{i}.{j}"] = block
    layers[FEATURE] = backbone
    return layers


def _width(block: nn.Module) -> int | None:
    """A block's output channels: those of its last batch norm or convolution (None: unknown)."""
    width = None
    for m in block.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            width = m.num_features
        elif isinstance(m, nn.Conv2d):
            width = m.out_channels
    return width


def layer_widths(backbone: nn.Module, feature_dim: int) -> dict[str, int]:
    """``{layer: number of units}`` of :func:`hidden_layers`."""
    layers = hidden_layers(backbone)
    return {n: feature_dim if n == FEATURE else int(_width(m) or 0) for n, m in layers.items()}


def taylor_importance(
    backbone: nn.Module,
    head: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    classes: list[int],
) -> dict[str, Tensor]:
    """Each hidden unit's importance to one task: ``{layer: [C_l]}``, the mean over the task's
    samples of ``|Σ_hw a · ∂ log p(y | x, C_t) / ∂a|`` (see the module).

    Args:
        backbone: images ``[B, ...]`` → pooled features ``[B, C]`` (in eval mode here).
        head: the auxiliary head, features ``[B, C]`` → union logits ``[B, U]``.
        batches: the task's ``(images [B, ...], task labels [B] in 0..k−1)``.
        classes: the union label of each task label (``C_t``, length ``k``).
    """
    layers = hidden_layers(backbone)
    captured: dict[str, Tensor] = {}
    handles = [
        module.register_forward_hook(_capture(captured, name)) for name, module in layers.items()
    ]
    index = torch.tensor(classes)
    sums: dict[str, Tensor] = {}
    count = 0
    was_training = backbone.training, head.training
    backbone.eval()
    head.eval()
    try:
        for images, labels in batches:
            captured.clear()
            logits = head(backbone(images))[:, index.to(images.device)]  # [B, k]
            logp = F.log_softmax(logits, dim=1).gather(1, labels.view(-1, 1).to(images.device))
            acts = [captured[n] for n in layers]
            grads = torch.autograd.grad(logp.sum(), acts)
            for name, a, g in zip(layers, acts, grads, strict=True):
                taylor = (a * g).flatten(2).sum(2) if a.dim() > 2 else a * g  # [B, C_l]
                total = taylor.abs().sum(0).detach().double().cpu()
                sums[name] = sums[name] + total if name in sums else total
            count += int(labels.numel())
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training[0])
        head.train(was_training[1])
    if count == 0:
        raise ValueError("no sample to estimate the units' importance from")
    return {name: (s / count).float() for name, s in sums.items()}


def _capture(store: dict[str, Tensor], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        store[name] = output

    return hook


def keep_masks(importance: dict[str, Tensor], keep: float) -> dict[str, Tensor]:
    """``{layer: bool [C_l]}``: the ``max(1, round(keep · C_l))`` most important units of each
    layer (ties broken towards the lower index)."""
    masks = {}
    for name, score in importance.items():
        k = max(1, round(keep * score.numel()))
        order = torch.sort(score, descending=True, stable=True).indices
        mask = torch.zeros(score.numel(), dtype=torch.bool)
        mask[order[:k]] = True
        masks[name] = mask
    return masks


def mask_overlap(masks: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, float]]:
    """Pairwise intersection over union of the tasks' kept units over every layer:
    ``{task: {task: IoU}}`` (``masks``: ``{task: {layer: [0/1 per unit]}}``)."""
    flat = {t: [u for layer in m.values() for u in layer] for t, m in masks.items()}
    out: dict[str, dict[str, float]] = {}
    for a, ma in flat.items():
        out[a] = {}
        for b, mb in flat.items():
            inter = sum(x and y for x, y in zip(ma, mb, strict=True))
            union = sum(x or y for x, y in zip(ma, mb, strict=True))
            out[a][b] = inter / union if union else 1.0
    return out


def check_pruned_arguments(
    keep: float = 0.5,
    auxiliary_weight: float = 1.0,
    auxiliary_steps: int | None = None,
    init_heads: bool = True,
    union: dict[str, list[int]] | None = None,
    auxiliary_head: bool = True,
) -> None:
    """Raise ``ValueError`` naming the argument for a setting that cannot be built."""
    if not 0 < float(keep) <= 1:
        raise ValueError(f"keep (the share of each layer's units a task keeps) must be in (0, 1], "
                         f"got {keep}")  # fmt: skip
    if not float(auxiliary_weight) >= 0:
        raise ValueError(f"auxiliary_weight must be >= 0, got {auxiliary_weight}")
    if auxiliary_steps is not None and int(auxiliary_steps) < 1:
        raise ValueError(f"auxiliary_steps must be >= 1 or null (train.max_steps), got "
                         f"{auxiliary_steps}")  # fmt: skip
    if union is not None and not all(isinstance(u, list) for u in union.values()):
        raise ValueError("union maps each task to the list of its classes' union labels")


class PrunedAuxiliaryNet(MultiDomainNet):
    """The tasks' networks pruned from the auxiliary network (see the module).

    One backbone; ``unit_masks`` (buffer, float 0/1 ``[T, N]``, ``N`` the hidden units of
    :func:`hidden_layers` in order) holds each task's mask, applied by forward hooks on those
    layers to the rows of that task's samples (all ones until :meth:`start_from` sets them).
    Tasks whose images share a shape go through the backbone as one batch, each sample with its
    own task's mask.

    Forward: ``{task: [B_t, 3, H, W]}`` → per task ``{"features": masked pooled features
    [B_t, C], "pred": [B_t, K_t]}``; in training, with the auxiliary head, also
    ``"auxiliary": [B_t, U]``, the union logits of the unpruned network on the same images (a
    second backbone pass; its loss is :class:`unirep.pipeline.overlap.AuxiliaryLoss`).

    Args:
        keep: the share of each layer's units a task keeps (recorded; the pipeline prunes).
        auxiliary_weight: the auxiliary loss's weight in the joint phase (0: no auxiliary head).
        auxiliary_steps: the auxiliary phase's steps (None: ``train.max_steps``).
        init_heads: each task's head starts from the auxiliary head's rows of its classes.
        union: ``{task: [union label of each task label]}``; None: the disjoint union.
        auxiliary_head: whether the network holds the auxiliary head (the export drops it).
    """

    def __init__(
        self,
        backbone: Callable[[], tuple[nn.Module, int]],
        num_classes: dict[str, int],
        backbone_state: dict[str, Tensor] | None = None,
        keep: float = 0.5,
        auxiliary_weight: float = 1.0,
        auxiliary_steps: int | None = None,
        init_heads: bool = True,
        union: dict[str, list[int]] | None = None,
        auxiliary_head: bool = True,
    ) -> None:
        check_pruned_arguments(keep, auxiliary_weight, auxiliary_steps, init_heads, union,
                               auxiliary_head)  # fmt: skip
        net, dim = backbone()
        if backbone_state is not None:
            net.load_state_dict(backbone_state, strict=True)
        super().__init__(net, dim, num_classes)
        if union is None:  # the disjoint union, in task order
            union, start = {}, 0
            for t, k in num_classes.items():
                union[t], start = list(range(start, start + k)), start + k
        if set(union) != set(num_classes) or any(
            len(union[t]) != k for t, k in num_classes.items()
        ):
            raise ValueError(f"union {union} does not fit the tasks' classes {num_classes}")
        self.keep, self.auxiliary_weight = float(keep), float(auxiliary_weight)
        self.auxiliary_steps = None if auxiliary_steps is None else int(auxiliary_steps)
        self.init_heads = bool(init_heads)
        self.union = {t: [int(c) for c in union[t]] for t in num_classes}
        self.union_size = 1 + max(c for u in self.union.values() for c in u)
        self.with_auxiliary_head = bool(auxiliary_head) and self.auxiliary_weight > 0
        self.auxiliary_head = nn.Linear(dim, self.union_size) if self.with_auxiliary_head else None
        self.widths = layer_widths(net, dim)
        names = list(num_classes)
        self.register_buffer("unit_masks", torch.ones(len(names), sum(self.widths.values())))
        self._rows: Tensor | None = None  # per sample of the running batch: its mask's row
        self._backbone = backbone
        offset = 0
        for name, module in hidden_layers(net).items():
            width = self.widths[name]
            module.register_forward_hook(self._masking(offset, width))
            offset += width

    # -- masks ----------------------------------------------------------------------------------

    def _masking(self, offset: int, width: int) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
            if self._rows is None:
                return None
            if output.shape[1] != width:
                raise ValueError(f"a hidden layer gave {output.shape[1]} units, expected {width}")
            mask = self._table()[self._rows, offset : offset + width].to(output.dtype)
            return output * mask.view(*mask.shape, *([1] * (output.dim() - 2)))

        return hook

    def _table(self) -> Tensor:
        """``[T + 1, N]``: the tasks' masks, then a row of ones (the unpruned network)."""
        masks: Tensor = self.unit_masks
        return torch.cat([masks, masks.new_ones(1, masks.shape[1])])

    def set_masks(self, masks: dict[str, dict[str, list[int]]]) -> None:
        """Set ``unit_masks`` from ``{task: {layer: [0/1 per unit]}}`` (every task, layer)."""
        rows = []
        for task in self.tasks:
            per_layer = masks[task]
            if list(per_layer) != list(self.widths) or any(
                len(per_layer[n]) != w for n, w in self.widths.items()
            ):
                raise ValueError(f"masks of {task!r} do not fit the layers {self.widths}")
            rows.append(torch.tensor([u for n in self.widths for u in per_layer[n]]))
        with torch.no_grad():
            self.unit_masks.copy_(torch.stack(rows).to(self.unit_masks))

    def masks(self) -> dict[str, dict[str, list[int]]]:
        """``{task: {layer: [0/1 per unit]}}`` of ``unit_masks``."""
        out = {}
        for i, task in enumerate(self.tasks):
            row = [int(v) for v in self.unit_masks[i].tolist()]
            out[task], offset = {}, 0
            for name, width in self.widths.items():
                out[task][name] = row[offset : offset + width]
                offset += width
        return out

    def start_from(self, backbone: nn.Module, head: nn.Linear, masks: dict[str, Any]) -> None:
        """Initialise from the auxiliary network (its ``backbone`` and union ``head``) and set
        the tasks' ``masks``: the backbone and auxiliary head copied, each task's head from the
        auxiliary head's rows of its classes (``init_heads``)."""
        self.backbone.load_state_dict(backbone.state_dict(), strict=True)
        with torch.no_grad():
            if self.auxiliary_head is not None:
                self.auxiliary_head.load_state_dict(head.state_dict(), strict=True)
            if self.init_heads:
                for task, rows in self.union.items():
                    self.heads[task].weight.copy_(head.weight[rows])
                    self.heads[task].bias.copy_(head.bias[rows])
        self.set_masks(masks)

    # -- forward --------------------------------------------------------------------------------

    def _through(self, images: Tensor, rows: Tensor) -> Tensor:
        """The backbone's pooled features ``[B, C]`` with each sample's mask row applied."""
        self._rows = rows
        try:
            return self.backbone(images)
        finally:
            self._rows = None

    def _shared_features(self, images: dict[str, Tensor]) -> dict[str, Tensor]:
        index = {t: i for i, t in enumerate(self.tasks)}
        rows = {
            t: torch.full((x.shape[0],), index[t], dtype=torch.long, device=x.device)
            for t, x in images.items()
        }
        shapes = {tuple(x.shape[1:]) for x in images.values()}
        if len(shapes) == 1 and len(images) > 1:
            sizes = [x.shape[0] for x in images.values()]
            feats = self._through(torch.cat(list(images.values())), torch.cat(list(rows.values())))
            return dict(zip(images, feats.split(sizes), strict=True))
        return {t: self._through(x, rows[t]) for t, x in images.items()}

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        out = super().forward(inputs)
        if self.training and self.auxiliary_head is not None:
            full = len(self.tasks)  # the row of ones: the unpruned auxiliary network
            for task, x in inputs.items():
                rows = torch.full((x.shape[0],), full, dtype=torch.long, device=x.device)
                out[task]["auxiliary"] = self.auxiliary_head(self._through(x, rows))
        return out

    def representation(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each task's pooled features through its own mask ``{task: [B_t, C]}``."""
        return super().representation(inputs)

    # -- records and export ---------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The keyword arguments this network was built with (``sharing_kwargs``)."""
        return {
            "keep": self.keep,
            "auxiliary_weight": self.auxiliary_weight,
            "auxiliary_steps": self.auxiliary_steps,
            "init_heads": self.init_heads,
            "union": {t: list(u) for t, u in self.union.items()},
            "auxiliary_head": self.auxiliary_head is not None,
        }

    def sharing_record(self) -> dict[str, Any]:
        """What ``metrics.json`` says of the pruning: the layers' widths, the units each task
        keeps per layer and the pairwise IoU of the tasks' masks (over all units, and per
        layer)."""
        masks = self.masks()
        per_layer = {
            layer: mask_overlap({t: {layer: m[layer]} for t, m in masks.items()})
            for layer in self.widths
        }
        return {
            "name": "pruned_auxiliary",
            "keep": self.keep,
            "auxiliary_weight": self.auxiliary_weight,
            "union_classes": self.union_size,
            "layers": dict(self.widths),
            "kept": {t: {n: sum(m[n]) for n in self.widths} for t, m in masks.items()},
            "overlap": mask_overlap(masks),
            "overlap_per_layer": per_layer,
        }

    def exported(self, architecture: dict[str, Any]) -> tuple[dict[str, Any], nn.Module]:
        """(architecture record, network) to export: without the auxiliary head (training only);
        predictions equal this network's in evaluation."""
        if self.auxiliary_head is None:
            return architecture, self
        settings = {**architecture.get("sharing_kwargs", {}), **self.settings(),
                    "auxiliary_head": False}  # fmt: skip
        net = PrunedAuxiliaryNet(self._backbone, self.classes(), **settings)
        state = self.state_dict()
        net.load_state_dict({k: state[k] for k in net.state_dict()}, strict=True)
        return {**architecture, "sharing_kwargs": settings}, net.train(self.training)

    def classes(self) -> dict[str, int]:
        """``{task: number of classes}``."""
        return {t: int(h.out_features) for t, h in self.heads.items()}
