"""Cross-task modules: how per-task branches read from shared features and from each other.

Two registered choices, built with ``CROSS_TASK.build(name, **kwargs)``:

- ``"mtan"``: :class:`TaskAttentionMasks`, task-specific soft attention over the shared encoder
  stages (MTAN: Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019).
- ``"densemtl"``: :class:`CrossTaskExchange`, a self-attention gate plus correlation-guided
  attention from every source task to every target task (DenseMTL: Lopes, Vu & de Charette,
  "Cross-task Attention Mechanism for Dense Multi-task Learning", WACV 2023), with attention on
  pooled tokens so its memory does not grow with the input resolution.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.registry import Registry

CROSS_TASK: Registry[nn.Module] = Registry("cross-task module")


def _check_task_names(tasks: list[str]) -> None:
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task names must be unique, got {tasks}")


# --------------------------------------------------------------------------------------------
# MTAN
# --------------------------------------------------------------------------------------------


class _AttentionMask(nn.Sequential):
    """MTAN's ``att_layer``: 1×1 conv–BN–ReLU–1×1 conv–BN–sigmoid, ``[B, C_in, H, W] -> (0, 1)``."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.Sigmoid(),
        )


class _StageProjection(nn.Sequential):
    """MTAN's ``encoder_block_att``: 3×3 conv–BN–ReLU from stage ``j`` width to stage ``j+1``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


@CROSS_TASK.register("mtan")
class TaskAttentionMasks(nn.Module):
    """Task-specific soft attention over the shared encoder stages (MTAN, Liu et al. CVPR 2019).

    The shared network is a "global feature pool"; each task owns, per stage ``j``, a small mask
    network ``a_j^t`` (1×1 conv–BN–ReLU–1×1 conv–BN–sigmoid) and reads

    ``â_j^t = a_j^t([g_j ⊕ p_j^t]) ⊙ g_j``, with ``p_j^t = pool(f_j(â_{j-1}^t))``

    where ``g_j`` is the shared stage-``j`` feature ``[B, C_j, H_j, W_j]``, ``⊕`` concatenates
    along channels, ``f_j`` is a 3×3 conv–BN–ReLU shared across tasks (``C_{j-1} → C_j``) and
    ``pool`` is an adaptive max-pool to ``(H_j, W_j)`` (MTAN's 2×2 max-pool when the resolution
    halves; nothing when it does not, as in dilated ResNets). Stage 0 has no previous feature, so
    its mask sees ``g_0`` alone.

    Args:
        tasks: task names; one set of masks per task (one task is allowed).
        channels: widths ``C_j`` of the shared stages, in encoder order.
        reduction: bottleneck width of each mask network is ``C_j // reduction`` (MTAN's SegNet
            uses 1, its ResNet variant 4).

    Forward: ``shared`` is a list of ``[B, C_j, H_j, W_j]`` tensors, one per stage; returns
    ``{task: [B, C_last, H_last, W_last]}``, the last stage's attended feature.
    """

    def __init__(self, tasks: list[str], channels: list[int], reduction: int = 1) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("mtan needs at least one task")
        if not channels:
            raise ValueError("mtan needs at least one shared stage (channels is empty)")
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        _check_task_names(tasks)
        self.tasks = list(tasks)
        self.channels = list(channels)

        def mask(stage: int) -> _AttentionMask:
            width = channels[stage]
            in_channels = width if stage == 0 else 2 * width
            return _AttentionMask(in_channels, max(width // reduction, 1), width)

        self.masks = nn.ModuleDict(
            {t: nn.ModuleList(mask(j) for j in range(len(channels))) for t in tasks}
        )
        self.projections = nn.ModuleList(
            _StageProjection(c_in, c_out) for c_in, c_out in pairwise(channels)
        )

    def forward_with_masks(
        self, shared: list[Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
        """Attended last-stage features ``{task: [B, C_last, H_last, W_last]}`` and the masks
        ``{task: [[B, C_j, H_j, W_j] in (0, 1) for each stage j]}``."""
        if len(shared) != len(self.channels):
            raise ValueError(f"expected {len(self.channels)} shared stages, got {len(shared)}")
        for j, (feat, width) in enumerate(zip(shared, self.channels, strict=True)):
            if feat.dim() != 4 or feat.shape[1] != width:
                raise ValueError(f"stage {j}: expected [B, {width}, H, W], got {list(feat.shape)}")
        attended: dict[str, Tensor] = {}
        masks: dict[str, list[Tensor]] = {}
        for task in self.tasks:
            task_masks: list[Tensor] = []
            feat = shared[0]
            for j, g in enumerate(shared):
                if j == 0:
                    mask_in = g
                else:
                    previous = self.projections[j - 1](feat)
                    if previous.shape[-2:] != g.shape[-2:]:
                        previous = F.adaptive_max_pool2d(previous, g.shape[-2:])
                    mask_in = torch.cat([g, previous], dim=1)
                mask = self.masks[task][j](mask_in)
                feat = mask * g
                task_masks.append(mask)
            attended[task] = feat
            masks[task] = task_masks
        return attended, masks

    def forward(self, shared: list[Tensor]) -> dict[str, Tensor]:
        return self.forward_with_masks(shared)[0]


# --------------------------------------------------------------------------------------------
# DenseMTL
# --------------------------------------------------------------------------------------------


def attention_tokens(h: int, w: int, pool: int) -> int:
    """Tokens per task seen by :class:`CrossTaskExchange` for an ``h × w`` feature map.

    Features are average-pooled to ``min(h, pool) × min(w, pool)``, so this is at most
    ``pool ** 2`` whatever the input size.
    """
    if min(h, w, pool) < 1:
        raise ValueError(f"h, w and pool must be positive, got {(h, w, pool)}")
    return min(h, pool) * min(w, pool)


def _pool_tokens(x: Tensor, pool: int) -> Tensor:
    """``[B, C, H, W] -> [B, C, min(H, pool), min(W, pool)]`` by adaptive average pooling."""
    h, w = x.shape[-2:]
    size = (min(h, pool), min(w, pool))
    return x if (h, w) == size else F.adaptive_avg_pool2d(x, size)


class SelfGate(nn.Module):
    """Self-attention gate of a task on its own feature (DenseMTL's SA block).

    ``scale · sigmoid(conv3×3(x)) ⊙ conv3×3(x)``: a per-position, per-channel gate. ``scale`` is a
    learned scalar initialised at 0, so the gate contributes nothing at initialisation.
    ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * torch.sigmoid(self.gate(x)) * self.value(x)


class CorrelationAttention(nn.Module):
    """Correlation-guided attention from one source task to one target task (DenseMTL's SxTAM).

    Queries come from the target feature, keys and values from the source feature, both
    average-pooled to at most ``pool × pool`` tokens (``P_t``, ``P_s`` ≤ ``pool²``); the
    ``heads``-head attention ``softmax(Q Kᵀ / √(C / heads)) V`` is reshaped to the pooled target
    grid, upsampled bilinearly to the target size and multiplied by a learned scalar initialised
    at 0 (DenseMTL uses a zero-initialised α for the same reason: start from the single-task
    features).

    Shapes: ``target [B, C, H_t, W_t]``, ``source [B, C, H_s, W_s]`` → ``[B, C, H_t, W_t]``; the
    attention matrix is ``[B, heads, P_t, P_s]`` (exposed as the output of ``self.softmax`` so it
    can be observed with a forward hook).
    """

    def __init__(self, channels: int, heads: int = 1, pool: int = 8) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.pool = pool
        # Bias-free: a key bias only adds a per-query constant that the softmax ignores.
        self.query = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.key = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.value = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.softmax = nn.Softmax(dim=-1)
        self.scale = nn.Parameter(torch.zeros(()))

    def _split_heads(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, self.heads, c // self.heads, h * w).transpose(-1, -2)

    def forward(self, target: Tensor, source: Tensor) -> Tensor:
        """``target [B, C, H_t, W_t]``, ``source [B, C, H_s, W_s]`` -> ``[B, C, H_t, W_t]``."""
        t_tokens = _pool_tokens(target, self.pool)
        s_tokens = _pool_tokens(source, self.pool)
        q = self._split_heads(self.query(t_tokens))  # [B, heads, P_t, C/heads]
        k = self._split_heads(self.key(s_tokens))  # [B, heads, P_s, C/heads]
        v = self._split_heads(self.value(s_tokens))
        attn = self.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))  # [B, h, P_t, P_s]
        b, c, h, w = t_tokens.shape
        message = (attn @ v).transpose(-1, -2).reshape(b, c, h, w)
        if (h, w) != target.shape[-2:]:
            message = F.interpolate(
                message, size=target.shape[-2:], mode="bilinear", align_corners=False
            )
        return self.scale * message


class _TargetExchange(nn.Module):
    """Everything one target task owns: its self gate, one attention per source, the fusion."""

    def __init__(self, sources: list[str], channels: int, heads: int, pool: int) -> None:
        super().__init__()
        self.sources = list(sources)
        self.self_gate = SelfGate(channels)
        self.attention = nn.ModuleDict(
            {s: CorrelationAttention(channels, heads=heads, pool=pool) for s in sources}
        )
        # Bias-free so that proj(0) = 0: with the zero-initialised scales the block is the identity
        # at init, while proj itself keeps a random init so the scales receive gradient.
        self.proj = nn.Conv2d((len(sources) + 1) * channels, channels, kernel_size=1, bias=False)

    def forward(self, x: Tensor, feats: dict[str, Tensor]) -> Tensor:
        parts = [self.self_gate(x)] + [self.attention[s](x, feats[s]) for s in self.sources]
        return x + self.proj(torch.cat(parts, dim=1))


@CROSS_TASK.register("densemtl")
class CrossTaskExchange(nn.Module):
    """Multi-task exchange block (DenseMTL's mTEB, Lopes, Vu & de Charette WACV 2023).

    For every target task ``t`` with feature ``x_t`` ``[B, C, H_t, W_t]``:

    ``x̃_t = x_t + proj([SA(x_t) ⊕ m_{s₁→t} ⊕ … ⊕ m_{s_{T-1}→t}])``

    where ``SA`` is :class:`SelfGate`, each ``m_{s→t}`` is :class:`CorrelationAttention` with
    queries from ``t`` and keys/values from source ``s ≠ t``, ``⊕`` concatenates along channels and
    ``proj`` is a bias-free 1×1 conv ``T·C → C``. Every message (gate included) is multiplied by
    its own learned scalar initialised at 0, so **the module is exactly the identity at
    initialisation** and learns how much to exchange.

    Difference from DenseMTL: the original attends over features nearest/max-pooled by a fixed
    factor 4 (8,192 tokens at 512×1024, ≈268 MB fp32 per pair per image); here both sides are
    average-pooled to at most ``pool × pool`` tokens (:func:`attention_tokens`), so each attention
    matrix holds at most ``B · heads · pool⁴`` entries, i.e.
    ``bytes = B · heads · (pool²)² · 4`` in fp32 per source→target pair (``B=2, heads=4, pool=8``:
    128 KiB), and ``T·(T−1)`` such pairs in total, whatever the input resolution.

    Args:
        tasks: task names (at least two: every target needs a source).
        channels: width ``C`` shared by all task features.
        pool: side of the largest token grid the attention sees.
        heads: attention heads; ``channels`` must be divisible by it.

    Forward: ``{task: [B, C, H_t, W_t]}`` (the spatial size may differ per task) -> the same keys
    and shapes.
    """

    def __init__(self, tasks: list[str], channels: int, pool: int = 8, heads: int = 1) -> None:
        super().__init__()
        if len(tasks) < 2:
            raise ValueError(
                "densemtl needs at least two tasks: each target task attends to the other tasks "
                f"as sources, and {list(tasks)} leaves no source"
            )
        _check_task_names(tasks)
        if channels < 1 or pool < 1 or heads < 1:
            raise ValueError(
                f"channels, pool and heads must be positive, got {(channels, pool, heads)}"
            )
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.tasks = list(tasks)
        self.channels = channels
        self.pool = pool
        self.heads = heads
        self.targets = nn.ModuleDict(
            {t: _TargetExchange([s for s in tasks if s != t], channels, heads, pool) for t in tasks}
        )

    def attention_bytes(self, batch_size: int, h: int, w: int, bytes_per_element: int = 4) -> int:
        """Size of one source→target attention matrix for ``h × w`` features (≤ the bound above)."""
        tokens = attention_tokens(h, w, self.pool)
        return batch_size * self.heads * tokens * tokens * bytes_per_element

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        if set(feats) != set(self.tasks):
            raise ValueError(f"expected features for tasks {self.tasks}, got {sorted(feats)}")
        for task, x in feats.items():
            if x.dim() != 4 or x.shape[1] != self.channels:
                raise ValueError(
                    f"task {task!r}: expected [B, {self.channels}, H, W], got {list(x.shape)}"
                )
        return {t: self.targets[t](feats[t], feats) for t in self.tasks}
