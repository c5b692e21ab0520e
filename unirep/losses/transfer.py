"""Cross-task consistency terms for multi-task dense prediction, for any ordered task pairs.

Nakano, Chen & Demachi, "Cross-Task Consistency Learning Framework for Multi-Task Learning"
(arXiv 2111.14122, 2021; code ``akarimoon/xtask_mt``). A small transfer network ``T_{a→b}``
maps the prediction of task ``a`` to a prediction of task ``b``; the student's direct
prediction ``ŷ_b`` and the transferred one ``T_{a→b}(ŷ_a)`` should agree. The reference has two
tasks (segmentation and depth) and the two transfers between them; :class:`CrossTaskTerms`
takes any number of tasks and any list of ordered pairs (every ordered pair by default), with
the terms

* ``"consistency"`` (the reference's ``xtsc``): ``d_b(T_{a→b}(ŷ_a), ŷ_b)`` with ``ŷ_b``
  detached, so it trains the transfer network and, through it, the prediction of ``a``;
* ``"alignment"`` (the reference's ``xtc``): ``T_{a→b}(ŷ_a)`` against the ground truth of ``b``,
  on the images labelled for ``b`` only. With partial labels this is how a labelled task
  teaches an unlabelled one: the gradient reaches ``ŷ_a`` even where ``a`` has no label;
* ``"cycle"`` (our addition): ``d_a(T_{b→a}(T_{a→b}(ŷ_a)), ŷ_a)`` with ``ŷ_a`` detached, for
  the pairs whose reverse is also used;
* ``"contrastive"`` (our addition): symmetric InfoNCE (:func:`~unirep.losses.contrastive.
  info_nce`) between pooled embeddings of ``ŷ_b`` and of ``T_{a→b}(ŷ_a)`` of the same image,
  the other images of the (global) batch as negatives.

Task kinds and shapes (``B`` images, ``H × W`` pixels, the same for every task), as in
:mod:`unirep.losses.joint`:

* ``"semantic"``: prediction logits ``[B, K, H, W]``; target int64 ``[B, H, W]``, -1 = ignored;
* ``"depth"``: prediction ``[B, 1, H, W]``; target ``[B, 1, H, W]`` (or ``[B, H, W]``), 0 = missing;
* ``"normal"``: prediction unit vectors ``[B, 3, H, W]``; target ``[B, 3, H, W]``, all-zero =
  missing.

A label mask is a bool tensor ``[B]`` per task: True where the image is labelled for that task.

No normalisation layer is used (the reference's default, ``--batch_norm`` off), so every image's
term is independent of the rest of the batch and nothing needs synchronising across processes;
the consistency, alignment and cycle terms are local means (DDP's gradient mean over processes
with equal batches gives the global mean), the contrastive term is global by construction.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.losses.contrastive import info_nce
from unirep.losses.dense import _float_pair, _masked_mean
from unirep.losses.distillation import _full_precision
from unirep.losses.joint import _check_tasks, _kinds, _target_map
from unirep.tasks import TaskKind, as_kind

__all__ = [
    "CrossTaskTerms",
    "TransferNet",
    "alignment_distance",
    "consistency_distance",
    "transfer_input",
    "transfer_output",
]

TERMS = ("consistency", "alignment", "cycle", "contrastive")
CLASS_DISTANCES = ("kl", "ce")


def _check_kind(kind: TaskKind | str) -> TaskKind:
    """``kind`` as a per-pixel :class:`~unirep.tasks.TaskKind` (a name is looked up)."""
    kind = as_kind(kind)
    if not kind.spatial:
        raise ValueError(f"task kind {kind.name!r} is not predicted per pixel")
    return kind


# ---------------------------------------------------------------------------------------------
# transfer network
# ---------------------------------------------------------------------------------------------


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3×3-ReLU-conv3×3-ReLU, no normalisation (the reference's ``TTDown``/``TTUp`` body)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.ReLU(inplace=True),
    )


class TransferNet(nn.Module):
    """Task-transfer mini U-Net (the reference's ``BaseTaskTransferNetWithSkipCN``).

    Down path, one block per entry of ``widths``: conv3×3-ReLU-conv3×3-ReLU to ``widths[k]``
    (kept as the skip), then 2×2 max-pooling. Up path, deepest first, one block per width:
    bilinear upsampling (``align_corners=True``, as the reference) to the size of the skip (×2,
    or the odd size the pooling rounded down from), concatenation with the skip,
    conv3×3-ReLU-conv3×3-ReLU to ``widths[k]``. A final 1×1 convolution without bias (as the
    reference) to ``out_channels``. No normalisation layer, PyTorch's default initialisation
    (both as the reference). The reference uses ``widths = (64, 128, 256)``.

    Wiring differs slightly from the reference, which concatenates the *pooled* encoder outputs
    (so its finest skip is at ``H/2``) and applies LogSoftmax to a segmentation output; here the
    skips are the pre-pooling maps (the finest at ``H × W``) and the output is raw (see
    :func:`transfer_output`; the distances apply their own log-softmax).

    Shapes: ``[B, in_channels, H, W]`` → ``[B, out_channels, H, W]`` for any ``H, W ≥ 2^D``,
    ``D = len(widths)``. Each image is processed independently of the others.
    """

    def __init__(
        self, in_channels: int, out_channels: int, widths: tuple[int, ...] = (16, 32, 64)
    ) -> None:
        super().__init__()
        widths = tuple(widths)
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty tuple of positive ints, got {widths}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}"
            )
        self.in_channels, self.out_channels, self.widths = in_channels, out_channels, widths
        ins = (in_channels, *widths[:-1])
        self.down = nn.ModuleList(_double_conv(i, w) for i, w in zip(ins, widths, strict=True))
        ups, below = [], widths[-1]
        for w in reversed(widths):
            ups.append(_double_conv(below + w, w))
            below = w
        self.up = nn.ModuleList(ups)
        self.head = nn.Conv2d(widths[0], out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, in_channels, H, W]`` to ``[B, out_channels, H, W]``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        smallest = 2 ** len(self.widths)
        if min(x.shape[-2:]) < smallest:
            raise ValueError(
                f"H × W = {tuple(x.shape[-2:])} is too small for {len(self.widths)} poolings "
                f"(need at least {smallest})"
            )
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        for block, skip in zip(self.up, reversed(skips), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = block(torch.cat([x, skip], 1))
        return self.head(x)


def transfer_input(kind: TaskKind | str, pred: Tensor) -> Tensor:
    """A prediction as a transfer network takes it (shapes unchanged, ``[B, C, H, W]``).

    Semantic logits → ``log_softmax`` over classes (the reference feeds ``T_s2d`` with
    ``LogSoftmax(seg)``); depth and normals as predicted (``T_d2s`` takes the raw depth).
    """
    return F.log_softmax(pred, dim=1) if _check_kind(kind).has_classes else pred


def transfer_output(kind: TaskKind | str, raw: Tensor) -> Tensor:
    """A transfer network's raw output as a prediction of ``kind`` (shapes unchanged).

    Normals are L2-normalised over channels (unit vectors, like the student's normal head);
    semantic logits and depth are returned unchanged.
    """
    return F.normalize(raw, dim=1, eps=1e-12) if _check_kind(kind).unit_vector else raw


# ---------------------------------------------------------------------------------------------
# distances
# ---------------------------------------------------------------------------------------------


def consistency_distance(
    kind: TaskKind | str, transferred: Tensor, direct: Tensor, semantic: str = "kl"
) -> Tensor:
    """Distance of a transferred prediction from the direct one (``direct`` is detached).

    Shapes: ``transferred`` and ``direct`` ``[B, C, H, W]``, identical → scalar. Per kind (the
    reference's consistency energies, ``const_energy.py`` and ``XTaskLoss``):

    * semantic, ``semantic="kl"``: ``KL(softmax(direct) ‖ softmax(transferred))`` summed over
      classes, averaged over pixels and images;
    * semantic, ``semantic="ce"``: cross-entropy of the transferred logits against
      ``argmax(direct)``, averaged over pixels and images;
    * depth and normal: mean absolute difference over all elements (``nn.L1Loss``).

    Computed in at least float32 with autocast off.
    """
    kind = _check_kind(kind)
    if semantic not in CLASS_DISTANCES:
        raise ValueError(f"unknown semantic distance {semantic!r}; valid: {list(CLASS_DISTANCES)}")
    if transferred.dim() != 4 or transferred.shape != direct.shape:
        raise ValueError(
            f"expected transferred and direct [B, C, H, W] of the same shape, got "
            f"{tuple(transferred.shape)} and {tuple(direct.shape)}"
        )
    with _full_precision(transferred.device):
        x, d = _float_pair(transferred, direct.detach())
        if not kind.has_classes:
            return (x - d).abs().mean()
        if semantic == "ce":
            return F.cross_entropy(x, d.argmax(1))
        log_q, log_p = F.log_softmax(x, 1), F.log_softmax(d, 1)
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(1).mean()


def alignment_distance(
    kind: TaskKind | str, transferred: Tensor, target: Tensor, mask: Tensor
) -> Tensor:
    """Distance of a transferred prediction from the ground truth, on labelled images only.

    Shapes: ``transferred`` ``[B, C, H, W]``; ``target`` as in the module docstring; ``mask``
    bool ``[B]`` → scalar. A pixel counts when its image is labelled (``mask``) and its target is
    valid; per kind (the reference's ``xtc`` losses, normals by analogy with depth):

    * semantic: cross-entropy against the label (-1 ignored);
    * depth: absolute error where the target is > 0;
    * normal: absolute error averaged over the 3 channels, where the target vector is non-zero.

    The result is the mean over the counted pixels of all labelled images together. Uncounted
    pixels are replaced by zeros before any arithmetic (as :mod:`unirep.losses.dense`), so they
    get exactly zero gradient; with no counted pixel the result is an exact 0 that stays in the
    graph, never NaN. Computed in at least float32 with autocast off; the target is detached.
    """
    kind = _check_kind(kind)
    target = _target_map(kind, target.detach())
    batch, size = transferred.shape[0], tuple(transferred.shape[-2:])
    expected = (batch, *size) if kind.has_classes else tuple(transferred.shape)
    if transferred.dim() != 4 or tuple(target.shape) != expected:
        raise ValueError(
            f"{kind.name} target {tuple(target.shape)} does not match the transferred prediction "
            f"{tuple(transferred.shape)}"
        )
    if tuple(mask.shape) != (batch,):
        raise ValueError(f"mask must be [B] = [{batch}], got {tuple(mask.shape)}")
    labelled = mask.to(device=transferred.device, dtype=torch.bool).view(-1, 1, 1, 1)
    with _full_precision(transferred.device):
        dtype = torch.promote_types(transferred.dtype, torch.float32)
        x = transferred.to(dtype)
        zero = torch.zeros((), dtype=dtype, device=x.device)
        if kind.has_classes:
            valid = (target != -1).unsqueeze(1) & labelled  # [B, 1, H, W]
            labels = torch.where(valid, target.unsqueeze(1), 0)
            nll = -F.log_softmax(torch.where(valid, x, zero), 1).gather(1, labels)
            return _masked_mean(nll, valid)
        target = target.to(dtype)
        if kind.unit_vector:
            valid = (target != 0).any(1, keepdim=True) & labelled
        else:  # a scalar map (depth): positive where measured
            valid = (target > 0) & labelled
        error = torch.where(valid, x - target, zero).abs().mean(1, keepdim=True)
        return _masked_mean(error, valid)


# ---------------------------------------------------------------------------------------------
# the terms
# ---------------------------------------------------------------------------------------------


def _projector(channels: int, embed_dim: int) -> nn.Sequential:
    """conv1×1 (``C → 32``)-ReLU → 4×4 average pooling → flatten → Linear(512 → ``embed_dim``).

    Shapes: ``[B, C, H, W]`` → ``[B, embed_dim]``.
    """
    return nn.Sequential(
        nn.Conv2d(channels, 32, 1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, embed_dim),
    )


def _pair_key(source: str, target: str) -> str:
    return f"{source}_to_{target}"


class CrossTaskTerms(nn.Module):
    """Cross-task consistency terms (Nakano et al., 2021) over ordered task pairs.

    ``pairs`` lists ordered pairs ``(a, b)`` of distinct tasks (``None``: all ``T(T − 1)``
    ordered pairs). Each pair has its own :class:`TransferNet` ``T_{a→b}`` (``C_a → C_b``
    channels) in :attr:`transfers`, keyed ``"a_to_b"``; the transferred prediction is
    ``T_{a→b}(ŷ_a) = transfer_output(b, net(transfer_input(a, ŷ_a)))``, computed once per
    forward and shared by the terms. ``terms`` chooses among (see the module docstring):

    * ``"consistency"``: :func:`consistency_distance` of ``b`` (``class_distance``: ``"kl"``
      or ``"ce"``) between ``T_{a→b}(ŷ_a)`` and ``ŷ_b`` detached;
    * ``"alignment"``: :func:`alignment_distance` of ``b`` between ``T_{a→b}(ŷ_a)`` and the
      target of ``b``, masked by the label mask of ``b``;
    * ``"cycle"``: consistency distance of ``a`` between ``T_{b→a}(T_{a→b}(ŷ_a))`` and ``ŷ_a``
      detached, over the pairs whose reverse is also in ``pairs`` (at least one must be);
    * ``"contrastive"``: symmetric :func:`~unirep.losses.contrastive.info_nce` at
      ``temperature`` between ``P_b(T_{a→b}(ŷ_a))`` and ``P_b(ŷ_b)``, where ``P_b`` (in
      :attr:`projectors`, keyed by task, only when this term is on) embeds
      ``transfer_input(b, ·)`` into ``[B, embed_dim]``; the other images are the negatives and
      both sides receive gradients.

    ``forward(preds, targets, masks)`` returns ``{term: scalar}`` for the enabled terms, each the
    mean over the pairs it applies to; weighting them is up to the caller. ``targets`` and
    ``masks`` are read only by ``"alignment"`` (pass empty dicts otherwise). Shapes as in the
    module docstring.
    """

    def __init__(
        self,
        task_kinds: Mapping[str, TaskKind | str],
        task_channels: dict[str, int],
        pairs: list[tuple[str, str]] | None = None,
        terms: tuple[str, ...] = ("consistency",),
        widths: tuple[int, ...] = (16, 32, 64),
        class_distance: str = "kl",
        temperature: float = 0.1,
        embed_dim: int = 64,
    ) -> None:
        super().__init__()
        task_kinds = _kinds(task_kinds)
        _check_tasks(task_kinds, task_channels)
        self.task_kinds = dict(task_kinds)
        self.tasks = list(task_kinds)
        self.task_channels = {t: task_channels[t] for t in self.tasks}
        if pairs is None:
            if len(self.tasks) < 2:
                raise ValueError(f"cross-task terms need at least two tasks, got {self.tasks}")
            pairs = [(a, b) for a in self.tasks for b in self.tasks if a != b]
        self.pairs = self._check_pairs(pairs)
        self.terms = self._check_terms(terms)
        if class_distance not in CLASS_DISTANCES:
            raise ValueError(
                f"unknown class_distance {class_distance!r}; valid: {list(CLASS_DISTANCES)}"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        self.class_distance = class_distance
        self.temperature = temperature
        self.cycle_pairs = [(a, b) for a, b in self.pairs if (b, a) in self.pairs]
        if "cycle" in self.terms and not self.cycle_pairs:
            raise ValueError(
                f"the cycle term needs a pair whose reverse is also a pair; pairs: {self.pairs}"
            )
        self.transfers = nn.ModuleDict(
            {
                _pair_key(a, b): TransferNet(self.task_channels[a], self.task_channels[b], widths)
                for a, b in self.pairs
            }
        )
        self.projectors: nn.ModuleDict | None = None
        if "contrastive" in self.terms:
            targets = dict.fromkeys(b for _, b in self.pairs)
            self.projectors = nn.ModuleDict(
                {b: _projector(self.task_channels[b], embed_dim) for b in targets}
            )

    def _check_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        checked: list[tuple[str, str]] = []
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(f"a pair must be (source, target), got {pair!r}")
            a, b = pair
            unknown = [t for t in (a, b) if t not in self.task_kinds]
            if unknown:
                raise ValueError(
                    f"pair {pair!r} names unknown tasks {unknown}; known: {self.tasks}"
                )
            if a == b:
                raise ValueError(f"pair {pair!r} maps a task to itself; pairs need distinct tasks")
            if (a, b) in checked:
                raise ValueError(f"pair {pair!r} is listed twice")
            checked.append((a, b))
        if not checked:
            raise ValueError("pairs is empty; give at least one (source, target) pair or None")
        keys = {_pair_key(a, b) for a, b in checked}
        if len(keys) != len(checked):
            raise ValueError(f"task names make the pair keys 'a_to_b' ambiguous: {checked}")
        return checked

    @staticmethod
    def _check_terms(terms: tuple[str, ...]) -> tuple[str, ...]:
        terms = tuple(terms)
        unknown = [t for t in terms if t not in TERMS]
        if unknown:
            raise ValueError(f"unknown terms {unknown}; valid: {list(TERMS)}")
        if not terms or len(set(terms)) != len(terms):
            raise ValueError(f"terms must name each of {list(TERMS)} at most once, got {terms}")
        return terms

    def transfer(self, source: str, target: str, pred: Tensor) -> Tensor:
        """``T_{source→target}`` applied to a prediction of ``source``: ``[B, C_t, H, W]``."""
        net = self.transfers[_pair_key(source, target)]
        x = transfer_input(self.task_kinds[source], pred)
        weight = next(net.parameters(), None)
        if weight is not None:
            x = x.to(weight.dtype)
        return transfer_output(self.task_kinds[target], net(x))

    def _check_inputs(
        self, preds: dict[str, Tensor], targets: dict[str, Tensor], masks: dict[str, Tensor]
    ) -> None:
        used = list(dict.fromkeys(t for pair in self.pairs for t in pair))
        missing = [t for t in used if t not in preds]
        if missing:
            raise ValueError(f"preds lack the tasks {missing}")
        shapes = {t: tuple(preds[t].shape) for t in used}
        bad = [t for t in used if len(shapes[t]) != 4 or shapes[t][1] != self.task_channels[t]]
        if bad:
            raise ValueError(
                f"predictions of {bad} are not [B, C_task, H, W]: {[shapes[t] for t in bad]}"
            )
        if len({(s[0], *s[2:]) for s in shapes.values()}) != 1:
            raise ValueError(f"every prediction must have the same B and H × W, got {shapes}")
        if "alignment" in self.terms:
            batch = shapes[used[0]][0]
            needed = list(dict.fromkeys(b for _, b in self.pairs))
            for what, values in (("targets", targets), ("masks", masks)):
                lacking = [t for t in needed if t not in values]
                if lacking:
                    raise ValueError(f"the alignment term needs {what} of the tasks {lacking}")
            wrong = [t for t in needed if tuple(masks[t].shape) != (batch,)]
            if wrong:
                raise ValueError(f"label masks of {wrong} are not [B] = [{batch}]")

    def forward(
        self, preds: dict[str, Tensor], targets: dict[str, Tensor], masks: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Return ``{term: scalar}`` for each enabled term, the mean over its pairs."""
        self._check_inputs(preds, targets, masks)
        kinds = self.task_kinds
        moved = {(a, b): self.transfer(a, b, preds[a]) for a, b in self.pairs}
        out: dict[str, Tensor] = {}
        for term in self.terms:
            values: list[Tensor] = []
            if term == "consistency":
                for (_, b), y in moved.items():
                    values.append(consistency_distance(kinds[b], y, preds[b], self.class_distance))
            elif term == "alignment":
                for (_, b), y in moved.items():
                    values.append(alignment_distance(kinds[b], y, targets[b], masks[b]))
            elif term == "cycle":
                for a, b in self.cycle_pairs:
                    back = self.transfer(b, a, moved[(a, b)])
                    values.append(
                        consistency_distance(kinds[a], back, preds[a], self.class_distance)
                    )
            else:
                assert self.projectors is not None
                direct: dict[str, Tensor] = {}
                for (_, b), y in moved.items():
                    project = self.projectors[b]
                    if b not in direct:
                        direct[b] = project(transfer_input(kinds[b], preds[b]))
                    z = project(transfer_input(kinds[b], y))
                    values.append(info_nce(z, direct[b], self.temperature, symmetric=True))
            out[term] = torch.stack(values).mean()
        return out
