"""Dense multi-task networks: an encoder, one light decoder and head per task, alignment adapters.

The dense counterpart of :mod:`unirep.models.network`. Teachers (one task) and the distilled
student (all tasks) are the same :class:`DenseMultiTaskNet`. The alignment adapters are not part
of it: :meth:`DenseMultiTaskNet.build_aligners` makes them for the phase's trainable module
(:mod:`unirep.training.trainable`), so the exported network never holds them.

Encoders come from :data:`DENSE_ENCODERS`:

- ``"segnet"``: :class:`~unirep.models.segnet.SegNetEncoder`, the encoder of MTAN's SegNet (Liu,
  Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019), which URL also
  uses for NYUv2 (also timm's ``segnet_mtan``, see :mod:`unirep.models.segnet`).
- ``"timm"``: :class:`TimmDenseEncoder`, any timm model with ``features_only=True``.

Both map images ``[B, 3, H, W]`` to a list of stage features ``[B, C_i, H_i, W_i]`` and expose
``channels`` (the ``C_i``) and ``reductions`` (``H / H_i``, nominal).

Alignment adapters follow Universal Representations (Li, Liu & Bilen, IJCV 2023, §3, NYUv2
setting): per task, one bias-free 1×1 conv on the student's bottleneck and one on its last decoder
feature, both mapped to the teacher's last decoder feature width.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import timm
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.models.backbones import check_backbone
from unirep.models.cross_task import CROSS_TASK
from unirep.models.segnet import SegNetEncoder, conv_bn_relu
from unirep.registry import Registry

DENSE_ENCODERS: Registry[nn.Module] = Registry("dense encoder")


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------

DENSE_ENCODERS.register("segnet")(SegNetEncoder)


@DENSE_ENCODERS.register("timm")
class TimmDenseEncoder(nn.Module):
    """Any timm model as a multi-scale encoder (``features_only=True``); weights never downloaded.

    Args:
        model_name: a timm model name supporting ``features_only`` (e.g. ``"resnet50"``,
            ``"mobilenetv3_small_050"``). Not ``name``, which ``Registry.build`` takes itself.
        out_indices: which feature levels to return (timm's default: all of them).
        pretrained: must be False; pretrained weights are refused.
        **kwargs: passed to ``timm.create_model``.

    Forward: ``[B, 3, H, W]`` -> list of ``[B, C_i, H_i, W_i]`` (channels first, even for models
    whose features are channels-last, which are permuted).
    """

    def __init__(
        self,
        model_name: str,
        out_indices: list[int] | tuple[int, ...] | None = None,
        pretrained: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if pretrained:
            raise ValueError("pretrained weights are never downloaded; set pretrained=false")
        check_backbone(model_name)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        try:
            self.model = timm.create_model(
                model_name, pretrained=False, features_only=True, **kwargs
            )
        except (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError) as err:
            raise ValueError(
                f"timm model {model_name!r} cannot be built with features_only=True "
                f"and {kwargs}: {err}"
            ) from err
        self.model_name = model_name
        self.channels: list[int] = list(self.model.feature_info.channels())
        self.reductions: list[int] = list(self.model.feature_info.reduction())

    def forward(self, images: Tensor) -> list[Tensor]:
        feats = []
        for x, c in zip(self.model(images), self.channels, strict=True):
            if x.shape[1] != c and x.shape[-1] == c:  # channels-last features (e.g. Swin)
                x = x.permute(0, 3, 1, 2).contiguous()
            feats.append(x)
        return feats


# --------------------------------------------------------------------------------------------
# Decoder and head
# --------------------------------------------------------------------------------------------


class PyramidDecoder(nn.Module):
    """A light FPN-like decoder for one task (Lin et al., "Feature Pyramid Networks", CVPR 2017).

    Each stage ``i`` goes through a 1×1 lateral conv ``C_i → D``; going top-down from the last
    stage, the running sum is upsampled bilinearly to the next stage's size and added to its
    lateral, down to the first (highest-resolution) stage; a 3×3 conv–BN–ReLU ``D → D`` ends it.

    Forward: list of ``[B, C_i, H_i, W_i]`` -> ``[B, D, H_0, W_0]``.
    """

    def __init__(self, channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, out_channels, kernel_size=1) for c in channels)
        self.fuse = conv_bn_relu(out_channels, out_channels)

    def forward(self, stages: list[Tensor]) -> Tensor:
        if len(stages) != len(self.laterals):
            raise ValueError(f"expected {len(self.laterals)} stages, got {len(stages)}")
        x = self.laterals[-1](stages[-1])
        for lateral, feat in zip(self.laterals[-2::-1], stages[-2::-1], strict=True):
            x = F.interpolate(x, size=feat.shape[-2:], mode="bilinear", align_corners=False)
            x = x + lateral(feat)
        return self.fuse(x)


class DenseHead(nn.Sequential):
    """MTAN's/URL's ``SegNet_head``: 3×3 conv–BN–ReLU ``D → D`` then 1×1 conv ``D → K``.

    ``[B, D, h, w] -> [B, K, h, w]`` (upsampling to the input size is done by the network).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            conv_bn_relu(in_channels, in_channels),
            nn.Conv2d(in_channels, out_channels, kernel_size=1),
        )


def _align_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """URL's alignment adapter: a bias-free 1×1 conv with Xavier-normal init."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
    nn.init.xavier_normal_(conv.weight)
    return conv


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class DenseMultiTaskNet(nn.Module):
    """Shared encoder → per-task decoder → per-task head, with optional cross-task modules.

    Pipeline for images ``[B, 3, H, W]``:

    1. the encoder gives shared stages ``g_i`` ``[B, C_i, H_i, W_i]``;
    2. with ``cross_task="mtan"``, each task reads its own attended stages ``a_i^t ⊙ g_i``
       (:class:`~unirep.models.cross_task.TaskAttentionMasks`, MTAN, CVPR 2019); otherwise every
       task reads the shared ``g_i``;
    3. a :class:`PyramidDecoder` per task gives ``[B, D, H_0, W_0]`` (``D = decoder_channels``);
    4. with ``cross_task="densemtl"``, the per-task decoder features are exchanged by
       :class:`~unirep.models.cross_task.CrossTaskExchange` (DenseMTL, WACV 2023; the identity at
       initialisation);
    5. a :class:`DenseHead` per task, upsampled bilinearly to ``H × W``. Tasks named in
       ``unit_vector`` (surface normals) are then L2-normalised along channels; every other
       output is raw: segmentation logits (the loss applies the softmax) and depth as an
       unconstrained regression (no positivity activation, as in MTAN and URL; the L1 loss only
       looks at valid pixels).

    Alignment adapters are not part of the network (they are dropped at export): a distilled
    student's come from :meth:`build_aligners` and live in the phase's trainable module.

    Args:
        encoder: a module mapping images to a list of stage features, with ``channels`` and
            ``reductions`` attributes (see :data:`DENSE_ENCODERS`).
        tasks: ``{task: output channels}``, e.g. ``{"semantic": 13, "depth": 1, "normal": 3}``.
        decoder_channels: width ``D`` of every task's decoder and head.
        cross_task: ``"mtan"``, ``"densemtl"`` or None (a key of ``CROSS_TASK``).
        cross_task_kwargs: extra arguments of the cross-task module (``reduction`` for MTAN,
            ``pool``/``heads`` for DenseMTL).
        unit_vector: tasks whose prediction is a unit vector per pixel (from the task kind).

    Forward returns, per task, ``{"pred": [B, K_t, H, W], "features": [B, D, H_0, W_0]`` (the last
    decoder feature, after any exchange), ``"bottleneck": [B, C_last, H_last, W_last]`` (the
    last-stage feature the task's decoder reads: shared, or the task's attended one with MTAN)``}``;
    with ``task_views`` set (and no MTAN), also ``"shared"``: the task's own views (``view_as``)
    of the encoder stages ``[[B, C_i, H_i, W_i], ...]``, which only its decoder reads, so that one
    backward gives every task's gradient w.r.t. the shared feature (SRDML,
    :mod:`unirep.losses.saliency`).
    The input is ``{stream: images [B, 3, H, W]}`` with a single stream (or the images tensor).
    """

    def __init__(
        self,
        encoder: nn.Module,
        tasks: dict[str, int],
        decoder_channels: int = 64,
        cross_task: str | None = None,
        cross_task_kwargs: dict[str, Any] | None = None,
        unit_vector: Iterable[str] = (),
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("at least one task is needed")
        bad = {t: k for t, k in tasks.items() if k < 1}
        if bad:
            raise ValueError(f"output channels must be positive, got {bad}")
        channels = getattr(encoder, "channels", None)
        if not channels or not hasattr(encoder, "reductions"):
            raise TypeError(
                "the encoder must expose `channels` and `reductions` (see DENSE_ENCODERS), "
                f"got {type(encoder).__name__}"
            )
        unknown = set(unit_vector) - set(tasks)
        if unknown:
            raise KeyError(
                f"unit_vector names unknown task(s) {sorted(unknown)}; tasks: {list(tasks)}"
            )
        self.encoder = encoder
        self.task_channels = dict(tasks)
        self.unit_vector = [t for t in tasks if t in set(unit_vector)]
        self.decoder_channels = decoder_channels
        self.cross_task_name = cross_task
        # SRDML (unirep.losses.saliency): each task's decoder reads its own view of the shared
        # stages, returned as outputs[t]["shared"]; off by default, set by the term's builder
        self.task_views = False
        names = list(tasks)

        self.attention: nn.Module | None = None  # MTAN masks, before the decoders
        self.exchange: nn.Module | None = None  # DenseMTL exchange, after the decoders
        if cross_task is not None:
            kwargs = dict(cross_task_kwargs or {})
            if cross_task == "mtan":
                self.attention = CROSS_TASK.build(
                    cross_task, tasks=names, channels=list(channels), **kwargs
                )
            elif cross_task == "densemtl":
                self.exchange = CROSS_TASK.build(
                    cross_task, tasks=names, channels=decoder_channels, **kwargs
                )
            else:
                CROSS_TASK.get(cross_task)  # unknown names fail with the choices
                raise ValueError(f"cross-task module {cross_task!r} is not wired into dense nets")
        elif cross_task_kwargs:
            raise ValueError(f"cross_task_kwargs {cross_task_kwargs} given without cross_task")

        self.decoders = nn.ModuleDict(
            {t: PyramidDecoder(list(channels), decoder_channels) for t in names}
        )
        self.heads = nn.ModuleDict({t: DenseHead(decoder_channels, k) for t, k in tasks.items()})

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    @staticmethod
    def images_of(inputs: dict[str, Tensor] | Tensor) -> Tensor:
        """The images ``[B, 3, H, W]`` of ``{stream: images}`` (one stream) or the tensor."""
        if isinstance(inputs, dict):
            if len(inputs) != 1:
                raise ValueError(f"a dense network reads one image stream, got {list(inputs)}")
            (images,) = inputs.values()
            return images
        return inputs

    def predict(self, task: str, feat: Tensor, size: tuple[int, int] | Any) -> Tensor:
        """``task``'s head on its decoder feature ``[B, D, H_0, W_0]``, upsampled bilinearly to
        ``size`` (``H × W``) and, for a unit-vector task, L2-normalised: ``[B, K, H, W]``."""
        pred = self.heads[task](feat)
        return self.finish(task, pred, size)

    def finish(self, task: str, pred: Tensor, size: tuple[int, int] | Any) -> Tensor:
        """A head's output ``[B, K, h, w]`` upsampled to ``size`` and, for a unit-vector task,
        L2-normalised along channels."""
        pred = F.interpolate(pred, size=size, mode="bilinear", align_corners=False)
        return F.normalize(pred, p=2, dim=1) if task in self.unit_vector else pred

    def forward(self, inputs: dict[str, Tensor] | Tensor) -> dict[str, dict[str, Tensor]]:
        images = self.images_of(inputs)
        shared = self.encoder(images)
        if self.attention is not None:
            _, masks = self.attention.forward_with_masks(shared)
            stages = {t: [m * g for m, g in zip(masks[t], shared, strict=True)] for t in masks}
        elif self.task_views:  # a gradient w.r.t. task t's view comes through t's decoder only
            stages = {t: [g.view_as(g) for g in shared] for t in self.tasks}
        else:
            stages = {t: shared for t in self.tasks}
        feats = {t: self.decoders[t](stages[t]) for t in self.tasks}
        if self.exchange is not None:
            feats = self.exchange(feats)

        out: dict[str, dict[str, Tensor]] = {}
        for task in self.tasks:
            pred = self.predict(task, feats[task], images.shape[-2:])
            bottleneck = stages[task][-1]
            out[task] = {"pred": pred, "features": feats[task], "bottleneck": bottleneck}
            if self.task_views and self.attention is None:
                out[task]["shared"] = stages[task]  # type: ignore[assignment]
        return out

    def representation(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The shared representation: ``{stream: the encoder's last stage [B, C_last, H_last,
        W_last]}`` for ``{stream: images [B, 3, H, W]}`` (SegNet: ``[B, C_5, ⌊H/32⌋, ⌊W/32⌋]``,
        which is timm's ``segnet_mtan.forward_features``); every task's decoder reads it (MTAN's
        attention masks, when present, are task-specific and not applied)."""
        if len(inputs) != 1:
            raise ValueError(f"a dense network reads one image stream, got {list(inputs)}")
        return {stream: self.encoder(images)[-1] for stream, images in inputs.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder's trainable parameters: what every task's loss reaches."""
        return [p for p in self.encoder.parameters() if p.requires_grad]

    @property
    def trunk(self) -> nn.Module:
        """The shared encoder."""
        return self.encoder

    @property
    def feature_dim(self) -> int:
        """Width of the last decoder feature (what a teacher's feature distillation targets)."""
        return self.decoder_channels

    def build_aligners(
        self, teacher_dims: dict[str, int], adapter: str = "linear", **kwargs: Any
    ) -> nn.ModuleDict:
        """URL's two 1×1 alignment adapters per task (Li, Liu & Bilen, IJCV 2023, NYUv2):
        ``linear`` (a per-pixel linear map) from the bottleneck ``C_last → A_t`` and from the
        last decoder feature ``D → A_t``; each task's aligner returns ``[aligned bottleneck
        [B, A_t, H_last, W_last], aligned features [B, A_t, H_0, W_0]]``. All bottleneck convs
        are initialised before all feature convs (the order of the networks that held them).
        ``teacher_dims`` may only name tasks of this network."""
        if adapter != "linear" or kwargs:
            raise ValueError(f"dense alignment adapters are linear 1x1 convs, got {adapter!r}")
        unknown = set(teacher_dims) - set(self.tasks)
        if unknown:
            raise KeyError(
                f"alignment adapters for unknown task(s) {sorted(unknown)}; tasks: {self.tasks}"
            )
        bottleneck = {t: _align_conv(self.encoder.channels[-1], d) for t, d in teacher_dims.items()}
        features = {t: _align_conv(self.decoder_channels, d) for t, d in teacher_dims.items()}
        return nn.ModuleDict({t: DenseAligner(bottleneck[t], features[t]) for t in teacher_dims})


class DenseAligner(nn.Module):
    """A task's two alignment adapters applied to its network output (see ``build_aligners``)."""

    def __init__(self, bottleneck: nn.Module, features: nn.Module) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.features = features

    def forward(self, output: dict[str, Tensor]) -> list[Tensor]:
        return [self.bottleneck(output["bottleneck"]), self.features(output["features"])]


def build_dense_encoder(name: str, **kwargs: Any) -> nn.Module:
    """Build the encoder registered as ``name`` in :data:`DENSE_ENCODERS`."""
    return DENSE_ENCODERS.build(name, **kwargs)


def build_dense_network(
    encoder: str,
    encoder_kwargs: dict[str, Any],
    tasks: dict[str, int],
    decoder_channels: int = 64,
    cross_task: str | None = None,
    cross_task_kwargs: dict[str, Any] | None = None,
    unit_vector: Iterable[str] = (),
) -> DenseMultiTaskNet:
    """Build a :class:`DenseMultiTaskNet`; a single-task teacher is the same with one task.

    ``encoder`` is a :data:`DENSE_ENCODERS` key (``"segnet"`` or ``"timm"``) built with
    ``encoder_kwargs`` (e.g. ``{"width_mult": 0.25}`` or ``{"model_name": "resnet50"}``).
    """
    net = build_dense_encoder(encoder, **encoder_kwargs)
    return DenseMultiTaskNet(
        net,
        tasks,
        decoder_channels=decoder_channels,
        cross_task=cross_task,
        cross_task_kwargs=cross_task_kwargs,
        unit_vector=unit_vector,
    )


def build_dense_from_architecture(
    architecture: dict[str, Any],
    tasks: dict[str, int],
    unit_vector: Iterable[str] = (),
) -> DenseMultiTaskNet:
    """Build the network an architecture record describes (teacher/student manifests, config).

    ``architecture`` holds ``encoder``, ``encoder_kwargs``, ``decoder_channels`` and, for a
    student, optionally ``cross_task`` and ``cross_task_kwargs``.
    """
    return build_dense_network(
        architecture["encoder"],
        dict(architecture.get("encoder_kwargs", {})),
        tasks,
        decoder_channels=architecture["decoder_channels"],
        cross_task=architecture.get("cross_task"),
        cross_task_kwargs=dict(architecture.get("cross_task_kwargs") or {}) or None,
        unit_vector=unit_vector,
    )
