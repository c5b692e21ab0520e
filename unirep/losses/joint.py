"""Joint-task losses for multi-task dense prediction from partially labelled images.

When an image has labels for some tasks only, these losses let the unlabelled tasks learn from
the labels of the others, through a small learned network that maps tasks into a joint space:

* :class:`MTPSLLoss`: MTPSL (Li, Liu & Bilen, "Learning Multiple Dense Prediction Tasks from
  Partially Annotated Data", CVPR 2022; code ``VICO-UoE/MTPSL``). One mapping network,
  conditioned on the ordered task pair by FiLM, maps the prediction of an unlabelled task and the
  label of a labelled task to a common space where they should agree. The cost grows with the
  number of task pairs.
* :class:`JTRLoss`: JTR (Nishi et al., "Joint-Task Regularization for Partially Labeled
  Multi-Task Learning", CVPR 2024; code ``KentoNishi/JTR-CVPR-2024``). All tasks' predictions
  and a copy where labels replace predictions are stacked and encoded by one auto-encoder; their
  codes should agree. The cost grows linearly with the number of tasks.

Task kinds and shapes (``B`` images, ``H × W`` pixels, the same for every task):

* ``"semantic"``: prediction logits ``[B, K, H, W]``; target int64 ``[B, H, W]``, -1 = ignored;
* ``"depth"``: prediction ``[B, 1, H, W]``; target ``[B, 1, H, W]`` (or ``[B, H, W]``), 0 = missing;
* ``"normal"``: prediction unit vectors ``[B, 3, H, W]``; target ``[B, 3, H, W]``, all-zero =
  missing.

A label mask is a bool tensor ``[B]`` per task: True where the image is labelled for that task.
Targets never receive a gradient.

Normalisation: both references use BatchNorm but run their network on one image at a time in
train mode, so every statistic is that of a single image. We use GroupNorm with one group per
channel, which computes exactly that inside any batch. Each image's (and each task pair's) term
is then independent of the rest of the batch, the batched loss equals the per-image loop of the
references, and there are no running statistics to synchronise across processes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from unirep.tasks import TaskKind, as_kind

__all__ = [
    "JTRLoss",
    "JointTaskSpace",
    "MTPSLLoss",
    "PairFiLMEncoder",
    "encode_for_mapping",
    "straight_through_one_hot",
]


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


def _kinds(task_kinds: Mapping[str, TaskKind | str]) -> dict[str, TaskKind]:
    """``{task: kind}`` with every kind a per-pixel :class:`~unirep.tasks.TaskKind`."""
    kinds = {t: as_kind(k) for t, k in task_kinds.items()}
    flat = sorted({k.name for k in kinds.values() if not k.spatial})
    if flat:
        raise ValueError(f"task kinds {flat} are not predicted per pixel")
    return kinds


def _check_tasks(task_kinds: dict[str, TaskKind], task_channels: dict[str, int]) -> None:
    """Refuse mismatched task names and channel counts that cannot be right."""
    if set(task_kinds) != set(task_channels):
        raise ValueError(
            f"task_kinds {sorted(task_kinds)} and task_channels {sorted(task_channels)} name "
            "different tasks"
        )
    for task, kind in task_kinds.items():
        channels = task_channels[task]
        fixed = channels if kind.has_classes else kind.out_channels(None)
        if channels != fixed or channels < 1:
            raise ValueError(f"task {task!r} of kind {kind.name!r} cannot have {channels} channels")


def _check_inputs(tasks: list[str], **named: dict[str, Tensor]) -> None:
    for what, values in named.items():
        missing = [t for t in tasks if t not in values]
        if missing:
            raise ValueError(f"{what} lack the tasks {missing}")
    preds, masks = named["preds"], named["masks"]
    sizes = {tuple(preds[t].shape[-2:]) for t in tasks}
    if len(sizes) != 1:
        raise ValueError(f"every task's prediction must have the same H × W, got {sorted(sizes)}")
    batch = preds[tasks[0]].shape[0]
    bad = [t for t in tasks if tuple(masks[t].shape) != (batch,)]
    if bad:
        raise ValueError(f"label masks of {bad} are not [B] = [{batch}]")


def _instance_norm(channels: int) -> nn.GroupNorm:
    """Per-image, per-channel normalisation with an affine part (see the module docstring)."""
    return nn.GroupNorm(channels, channels)


def _conv_norm_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        _instance_norm(out_channels),
        nn.ReLU(inplace=True),
    )


def _init_convs(module: nn.Module) -> None:
    """Xavier-normal convolution weights and zero biases, as both references."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _target_map(kind: TaskKind, target: Tensor) -> Tensor:
    """A one-channel regression target ``[B, H, W]`` (depth) as ``[B, 1, H, W]``; class
    labels and ``[B, C, H, W]`` targets unchanged."""
    return target.unsqueeze(1) if not kind.has_classes and target.dim() == 3 else target


def _valid_pixels(kind: TaskKind, target: Tensor) -> Tensor:
    """``[B, 1, H, W]`` bool: where ``target`` (``[B, H, W]`` or ``[B, C, H, W]``) is labelled:
    a class other than -1, or a value that is not all-zero."""
    if kind.has_classes:
        return (target != -1).unsqueeze(1)
    return (_target_map(kind, target) != 0).any(1, keepdim=True)


def _one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Labels ``[B, H, W]`` (-1 ignored) → one-hot ``[B, K, H, W]``, all-zero where ignored."""
    hot = F.one_hot(labels.clamp_min(0), num_classes).permute(0, 3, 1, 2).float()
    return hot * (labels != -1).unsqueeze(1)


def _cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """``1 − cos`` along channels of ``[N, C, h, w]`` tensors, averaged over positions → ``[N]``.

    Computed in at least float32.
    """
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    cos = F.cosine_similarity(a.to(dtype), b.to(dtype), dim=1, eps=1e-8)
    return (1.0 - cos).flatten(1).mean(1)


def straight_through_one_hot(logits: Tensor) -> Tensor:
    """One-hot of the argmax along dim 1 whose gradient is the softmax's.

    Shapes: ``[B, K, H, W]`` → ``[B, K, H, W]``. The forward value is exactly one-hot (the soft
    part enters as ``soft − soft.detach()``, an exact zero).
    """
    soft = logits.softmax(1)
    hard = F.one_hot(logits.argmax(1), logits.shape[1]).movedim(-1, 1).to(soft.dtype)
    return hard + (soft - soft.detach())


# ---------------------------------------------------------------------------------------------
# MTPSL
# ---------------------------------------------------------------------------------------------


def encode_for_mapping(
    kind: TaskKind | str,
    x: Tensor,
    is_target: bool,
    num_classes: int | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """Bring a prediction or a target to MTPSL's mapping-network input (``[B, C, H, W]``, float).

    * semantic prediction (logits ``[B, K, H, W]``): :func:`straight_through_one_hot`. MTPSL
      uses ``gumbel_softmax(hard=True)``; we take the argmax without Gumbel noise, our choice, so
      that the loss is deterministic;
    * semantic target (``[B, H, W]``, -1 ignored): one-hot over ``num_classes``, all-zero where
      ignored;
    * depth: divided by its per-image maximum absolute value (the maximum, for non-negative depth),
      guarded by ``eps``; missing target pixels (0) stay 0;
    * normal: ``(n + 1) / 2``; missing target pixels (all-zero) stay 0.

    Targets are detached. The kind decides by its traits (:class:`~unirep.tasks.TaskKind`):
    classes (semantic), unit vectors (normal), otherwise a scalar map (depth).
    """
    kind = as_kind(kind)
    if not kind.spatial:
        raise ValueError(f"task kind {kind.name!r} is not predicted per pixel")
    if is_target:
        x = _target_map(kind, x.detach())
    if kind.has_classes:
        if not is_target:
            return straight_through_one_hot(x)
        if num_classes is None:
            raise ValueError(f"a {kind.name} target needs num_classes")
        return _one_hot(x, num_classes)
    if kind.unit_vector:
        encoded = (x + 1.0) / 2.0
        return encoded * _valid_pixels(kind, x) if is_target else encoded
    return x / x.abs().amax((1, 2, 3), keepdim=True).clamp_min(eps)


class _FiLMStage(nn.Module):
    """conv3×3 → norm → FiLM(γ[pair], β[pair]) → ReLU → max-pool 2, for ``num_pairs`` pairs."""

    def __init__(self, in_channels: int, out_channels: int, num_pairs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = _instance_norm(out_channels)
        self.gamma = nn.Parameter(torch.ones(num_pairs, out_channels))
        self.beta = nn.Parameter(torch.zeros(num_pairs, out_channels))

    def forward(self, x: Tensor, pair: Tensor) -> Tensor:
        x = self.norm(self.conv(x))
        x = x * self.gamma[pair][:, :, None, None] + self.beta[pair][:, :, None, None]
        return F.max_pool2d(F.relu(x), 2)


class PairFiLMEncoder(nn.Module):
    """MTPSL's mapping network, conditioned on an ordered task pair (Li et al., CVPR 2022).

    A task-specific stem conv3×3(``C_task`` → ``widths[0]``)-norm-ReLU, then shared stages
    conv3×3-norm-FiLM-ReLU-maxpool2 (one per entry of ``widths``), a 1×1 conv to
    ``out_channels``, and a resize to the requested ``size`` (adaptive average pooling when
    shrinking, bilinear otherwise) so that the output compares with a student feature.

    FiLM: each stage holds ``γ, β`` of shape ``[P, C]`` for the ``P = T(T − 1)`` ordered pairs
    ``(s, t)``, ``s ≠ t`` (row-major, diagonal removed, as in MTPSL), initialised to 1 and 0;
    instance ``n`` uses row ``pair[n]``, which equals MTPSL's ``A · Γᵀ`` with a one-hot pair code
    ``A``, without its global variable. MTPSL's trunk is the 5-stage SegNet encoder (64 → 512
    channels); ``widths`` makes it small.

    Shapes: :meth:`stem` ``[N, C_task, H, W]`` → ``[N, widths[0], H, W]``; :meth:`trunk`
    ``[N, widths[0], H, W]`` and ``pair [N]`` (int64) → ``[N, out_channels, *size]``.
    """

    def __init__(
        self,
        task_channels: dict[str, int],
        out_channels: int,
        widths: tuple[int, ...] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if len(task_channels) < 2:
            raise ValueError(f"a task pair needs at least two tasks, got {list(task_channels)}")
        if not widths:
            raise ValueError("widths must name at least one stage")
        self.tasks = list(task_channels)
        self.pairs = [(s, t) for s in self.tasks for t in self.tasks if s != t]
        self.stems = nn.ModuleDict(
            {task: _conv_norm_relu(c, widths[0]) for task, c in task_channels.items()}
        )
        ins = (widths[0], *widths[:-1])
        self.stages = nn.ModuleList(
            _FiLMStage(i, o, len(self.pairs)) for i, o in zip(ins, widths, strict=True)
        )
        self.head = nn.Conv2d(widths[-1], out_channels, 1)
        _init_convs(self)

    def pair_index(self, source: str, target: str) -> int:
        """The row of the FiLM parameters used for the ordered pair ``(source, target)``."""
        return self.pairs.index((source, target))

    def film_parameters(self) -> list[nn.Parameter]:
        """Every FiLM ``γ`` and ``β`` (MTPSL trains them with their own learning rate)."""
        return [p for stage in self.stages for p in (stage.gamma, stage.beta)]

    def stem(self, task: str, x: Tensor) -> Tensor:
        return self.stems[task](x)

    def trunk(self, x: Tensor, pair: Tensor, size: tuple[int, int]) -> Tensor:
        for stage in self.stages:
            x = stage(x, pair)
        x = self.head(x)
        if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
            return F.adaptive_avg_pool2d(x, size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, x: Tensor, task: str, pair: Tensor, size: tuple[int, int]) -> Tensor:
        """Map inputs of one ``task`` under per-instance ``pair`` indices to ``[N, C, *size]``."""
        return self.trunk(self.stem(task, x), pair, size)


class MTPSLLoss(nn.Module):
    """MTPSL cross-task consistency (Li, Liu & Bilen, CVPR 2022), batched over images and pairs.

    For image ``i`` and ordered pair ``(s, t)``, ``s ≠ t``, with the mapping ``M`` conditioned
    on ``(s, t)`` for both of its inputs and ``f = feature[i]`` detached::

        L = (1 − cos(M(ŷ_s), M(y_t))) + λ_reg · [(1 − cos(M(ŷ_s), f)) + (1 − cos(M(y_t), f))]

    with ``cos`` along channels, averaged over positions; inputs prepared by
    :func:`encode_for_mapping`. The regulariser ties the joint space to the student's bottleneck
    so that ``M`` cannot collapse to a constant. Pairs used:

    * ``mode="partial"`` (MTPSL's partial-label settings): ``s`` unlabelled and ``t`` labelled
      for image ``i``;
    * ``mode="full"``: every ``s ≠ t`` with ``t`` labelled. MTPSL's ``full`` uses all ``T(T − 1)``
      pairs and is run on fully labelled data, where the two agree; a pair whose target task is
      unlabelled has no label to map, so it is left out.

    Returns ``Σ_i Σ_pairs L / B`` (MTPSL sums the pairs of an image and averages over the batch),
    an exact zero (connected to the predictions, with zero gradient) when no image has a pair.
    All (image, pair) instances go through the stems grouped by task and then through the shared
    trunk at once; MTPSL loops over images and pairs.

    Shapes: ``preds``, ``targets`` as in the module docstring, ``masks[task]`` bool ``[B]``,
    ``feature`` ``[B, feature_channels, h, w]`` (MTPSL: the SegNet bottleneck of the same view).
    The FiLM parameters (:meth:`film_parameters`) take their own learning rate in MTPSL (1e-3 on
    NYU-v2, 1e-5 on Cityscapes, against 1e-4 for everything else).
    """

    def __init__(
        self,
        task_kinds: Mapping[str, TaskKind | str],
        task_channels: dict[str, int],
        feature_channels: int,
        lambda_reg: float = 0.5,
        mode: str = "partial",
        widths: tuple[int, ...] = (16, 32, 64),
    ) -> None:
        super().__init__()
        task_kinds = _kinds(task_kinds)
        _check_tasks(task_kinds, task_channels)
        if mode not in ("partial", "full"):
            raise ValueError(f"mode must be 'partial' or 'full', got {mode!r}")
        self.task_kinds = dict(task_kinds)
        self.tasks = list(task_kinds)
        self.task_channels = {t: task_channels[t] for t in self.tasks}
        self.feature_channels = feature_channels
        self.lambda_reg = lambda_reg
        self.mode = mode
        self.mapping = PairFiLMEncoder(self.task_channels, feature_channels, widths)
        index = {t: k for k, t in enumerate(self.tasks)}
        pairs = torch.tensor([(index[s], index[t]) for s, t in self.mapping.pairs])
        self.register_buffer("pair_source", pairs[:, 0].clone(), persistent=False)
        self.register_buffer("pair_target", pairs[:, 1].clone(), persistent=False)

    def film_parameters(self) -> list[nn.Parameter]:
        """The FiLM ``γ`` and ``β`` of the mapping network (for their own optimiser group)."""
        return self.mapping.film_parameters()

    def instances(self, masks: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(image, pair)`` indices ``[N]`` of every term of the loss, image-major."""
        labelled = torch.stack([masks[t].bool() for t in self.tasks], 1)  # [B, T]
        source_ok = ~labelled if self.mode == "partial" else torch.ones_like(labelled)
        source, target = self.pair_source.to(labelled.device), self.pair_target.to(labelled.device)
        valid = source_ok[:, source] & labelled[:, target]  # [B, P]
        image, pair = valid.nonzero(as_tuple=True)
        return image, pair

    def forward(
        self,
        preds: dict[str, Tensor],
        targets: dict[str, Tensor],
        masks: dict[str, Tensor],
        feature: Tensor,
    ) -> Tensor:
        """Return the summed consistency loss divided by the batch size (a scalar)."""
        _check_inputs(self.tasks, preds=preds, targets=targets, masks=masks)
        if feature.dim() != 4 or feature.shape[1] != self.feature_channels:
            raise ValueError(
                f"expected feature [B, {self.feature_channels}, h, w], got {tuple(feature.shape)}"
            )
        batch = feature.shape[0]
        image, pair = self.instances({t: masks[t].to(feature.device) for t in self.tasks})
        n = image.numel()
        if n == 0:
            return torch.stack([preds[t][:0].sum() for t in self.tasks]).sum()

        # Rows 0..n-1 map the source predictions, rows n..2n-1 the target labels.
        source, target = self.pair_source[pair], self.pair_target[pair]
        dtype = self.mapping.head.weight.dtype
        stemmed, rows = [], []
        for k, task in enumerate(self.tasks):
            kind, classes = self.task_kinds[task], self.task_channels[task]
            parts, task_rows = [], []
            for side, values, is_target in ((source, preds, False), (target, targets, True)):
                idx = (side == k).nonzero(as_tuple=True)[0]
                if idx.numel():
                    x = values[task][image[idx]]
                    parts.append(encode_for_mapping(kind, x, is_target, classes).to(dtype))
                    task_rows.append(idx + n if is_target else idx)
            if parts:
                stemmed.append(self.mapping.stem(task, torch.cat(parts)))
                rows.extend(task_rows)
        x = torch.cat(stemmed)[torch.argsort(torch.cat(rows))]
        codes = self.mapping.trunk(x, pair.repeat(2), (feature.shape[-2], feature.shape[-1]))
        s_code, t_code = codes[:n], codes[n:]
        f = feature.detach()[image]
        reg = _cosine_distance(s_code, f) + _cosine_distance(t_code, f)
        loss = _cosine_distance(s_code, t_code) + self.lambda_reg * reg
        return loss.sum() / batch


# ---------------------------------------------------------------------------------------------
# JTR
# ---------------------------------------------------------------------------------------------


class _StackEncoder(nn.Module):
    """Stages conv3×3-norm-ReLU → max-pool 2 (indices kept for unpooling, as SegNet)."""

    def __init__(self, in_channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        ins = (in_channels, *widths[:-1])
        self.stages = nn.ModuleList(_conv_norm_relu(i, o) for i, o in zip(ins, widths, strict=True))

    def forward(self, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, torch.Size]]]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            size = x.shape[-2:]
            x, indices = F.max_pool2d(x, 2, return_indices=True)
            skips.append((indices, size))
        return x, skips


class _StackDecoder(nn.Module):
    """Mirror of :class:`_StackEncoder`: max-unpool → conv3×3-norm-ReLU, then a 1×1 conv."""

    def __init__(self, out_channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        outs = (widths[0], *widths[:-1])
        self.stages = nn.ModuleList(
            _conv_norm_relu(i, o) for i, o in zip(widths, outs, strict=True)
        )
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, code: Tensor, skips: list[tuple[Tensor, torch.Size]]) -> Tensor:
        x = code
        for stage, (indices, size) in zip(reversed(self.stages), reversed(skips), strict=True):
            x = stage(F.max_unpool2d(x, indices, 2, output_size=size))
        return self.head(x)


class JointTaskSpace(nn.Module):
    """JTR's joint-task auto-encoder (Nishi et al., CVPR 2024): a small SegNet-style network.

    ``forward``: a stack of task maps ``[B, ΣC_t, H, W]`` → (bottleneck code
    ``[B, widths[-1], H / 2^D, W / 2^D]`` with ``D = len(widths)``, reconstruction logits
    ``[B, ΣC_t, H, W]``). JTR uses the 5-stage SegNet (64 → 512 channels); ``widths`` makes it
    small. ``H`` and ``W`` must be at least ``2^D``.
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (32, 64)) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one stage")
        self.encoder = _StackEncoder(in_channels, widths)
        self.decoder = _StackDecoder(in_channels, widths)
        _init_convs(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        code, skips = self.encoder(x)
        return code, self.decoder(code, skips)


class JTRLoss(nn.Module):
    """Joint-task regularisation (Nishi et al., CVPR 2024), one view, batched over images.

    Two stacks ``[B, ΣC_t, H, W]`` (channels in the order of ``task_kinds``), see :meth:`stacks`:

    * predictions: semantic as softmax probabilities, depth as ``Φ((d − μ) / σ)`` (JTR's
      squashing, with JTR's NYU-v2 depth statistics by default; pass the dataset's), normals as
      ``(n + 1) / 2``. A task labelled for the image enters detached, as in JTR: the loss trains
      the predictions of unlabelled tasks only;
    * targets: the encoded label where the image is labelled for the task and the pixel is
      valid, the detached prediction elsewhere (semantic as a one-hot of the argmax).

    ``distance`` = ``1 − cos`` between the two bottleneck codes, along channels, averaged over
    positions and images. ``reconstruction`` = the decoder's error on each stack, summed over both
    stacks and over tasks (JTR's choice of losses): semantic binary cross-entropy with logits
    (summed over classes), depth L1 after a sigmoid, normals ``1 − cos`` against ``2x − 1``; each
    averaged over pixels and images. ``total = distance_weight · distance +
    reconstruction_weight · reconstruction``.

    Gradient routing follows JTR: the distance reaches the predictions through the network with
    its parameters frozen (JTR: a deep copy), and the network learns from the distance (weighted
    by ``reconstruction_weight`` as well, as JTR's ``recon_dist_weight``) and the reconstruction on
    detached stacks, so the reconstruction never reaches the predictions. That is two batched
    passes of the encoder, one of the decoder: linear in the number of tasks.

    Departures from JTR: one view instead of three (JTR's view 1 feeds the predictions, view 2 the
    network); semantic predictions stay soft in both passes (JTR uses a hard Gumbel sample in
    view 1) and the target stack is detached (JTR lets the substituted predictions carry a
    gradient); an invalid target pixel keeps the prediction (JTR zeroes every prediction where
    any labelled task is invalid); means over pixels instead of JTR's division by non-zero
    entries. An image with no label contributes the distance between its soft and one-hot
    predictions, as JTR's formula gives.

    Returns ``(total, {"distance": ..., "reconstruction": ...})``, the parts detached.
    """

    def __init__(
        self,
        task_kinds: Mapping[str, TaskKind | str],
        task_channels: dict[str, int],
        distance_weight: float = 4.0,
        reconstruction_weight: float = 2.0,
        widths: tuple[int, ...] = (32, 64),
        depth_mean: float = 2.3618,
        depth_std: float = 1.5876,
    ) -> None:
        super().__init__()
        task_kinds = _kinds(task_kinds)
        _check_tasks(task_kinds, task_channels)
        if depth_std <= 0:
            raise ValueError(f"depth_std must be positive, got {depth_std}")
        self.task_kinds = dict(task_kinds)
        self.tasks = list(task_kinds)
        self.task_channels = {t: task_channels[t] for t in self.tasks}
        self.distance_weight = distance_weight
        self.reconstruction_weight = reconstruction_weight
        self.depth_mean, self.depth_std = depth_mean, depth_std
        self.space = JointTaskSpace(sum(self.task_channels.values()), widths)

    def _encode(self, kind: TaskKind, x: Tensor) -> Tensor:
        """Depth and normal maps (prediction or label) as they enter the stack."""
        if kind.unit_vector:
            return (x + 1.0) / 2.0
        return torch.special.ndtr((x - self.depth_mean) / self.depth_std)

    def stacks(
        self, preds: dict[str, Tensor], targets: dict[str, Tensor], masks: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """The prediction stack and the label-substituted stack, both ``[B, ΣC_t, H, W]``."""
        _check_inputs(self.tasks, preds=preds, targets=targets, masks=masks)
        dtype = self.space.decoder.head.weight.dtype
        pred_parts, target_parts = [], []
        for task in self.tasks:
            kind, pred = self.task_kinds[task], preds[task]
            target = _target_map(kind, targets[task].detach())
            labelled = masks[task].bool().view(-1, 1, 1, 1)
            if kind.has_classes:
                encoded = pred.softmax(1)
                guess = F.one_hot(pred.argmax(1), pred.shape[1]).movedim(-1, 1).to(dtype)
                label = _one_hot(target, self.task_channels[task])
            else:
                encoded = self._encode(kind, pred)
                guess = encoded.detach()
                label = self._encode(kind, target)
            use_label = labelled & _valid_pixels(kind, target)
            pred_parts.append(torch.where(labelled, encoded.detach(), encoded).to(dtype))
            target_parts.append(torch.where(use_label, label.to(dtype), guess.to(dtype)))
        return torch.cat(pred_parts, 1), torch.cat(target_parts, 1)

    def _reconstruction_error(self, recon: Tensor, stack: Tensor) -> Tensor:
        """Per-row reconstruction error ``[N]`` of ``recon`` (logits) against ``stack``."""
        dtype = torch.promote_types(recon.dtype, torch.float32)
        recon, stack = recon.to(dtype), stack.to(dtype)
        channels = list(self.task_channels.values())
        error = recon.new_zeros(recon.shape[0])
        for task, r, x in zip(
            self.tasks, recon.split(channels, 1), stack.split(channels, 1), strict=True
        ):
            kind = self.task_kinds[task]
            if kind.has_classes:
                e = F.binary_cross_entropy_with_logits(r, x, reduction="none").sum(1)
            elif kind.unit_vector:
                e = 1.0 - F.cosine_similarity(r, 2.0 * x - 1.0, dim=1, eps=1e-8)
            else:
                e = (torch.sigmoid(r) - x).abs().sum(1)
            error = error + e.flatten(1).mean(1)
        return error

    def forward(
        self, preds: dict[str, Tensor], targets: dict[str, Tensor], masks: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(total, {"distance", "reconstruction"})``; total is a scalar."""
        pred_stack, target_stack = self.stacks(preds, targets, masks)
        batch = pred_stack.shape[0]
        both = torch.cat([pred_stack, target_stack])

        # The predictions learn through the network with frozen parameters (JTR's deep copy).
        frozen = {name: p.detach() for name, p in self.space.encoder.named_parameters()}
        codes, _ = functional_call(self.space.encoder, frozen, (both,))
        distance = _cosine_distance(codes[:batch], codes[batch:]).mean()

        # The network learns from detached stacks: the same distance, and the reconstruction.
        codes, recon = self.space(both.detach())
        net_distance = _cosine_distance(codes[:batch], codes[batch:]).mean()
        reconstruction = self._reconstruction_error(recon, both.detach()).sum() / batch

        # net_distance − its detached self is 0 in value: total reads as documented.
        routed = distance + self.reconstruction_weight * (net_distance - net_distance.detach())
        total = self.distance_weight * routed + self.reconstruction_weight * reconstruction
        return total, {"distance": distance.detach(), "reconstruction": reconstruction.detach()}
