"""Student architectures that decide what the tasks share: ``dense.sharing`` chooses one.

The default dense student (:class:`~unirep.models.dense.DenseMultiTaskNet`) shares one encoder
between all tasks. An entry of :data:`SHARING` replaces it with a network that learns, per task,
how much to share. Each entry is built from the same encoder, decoder and head pieces, so a
teacher (one task, no sharing) and the student keep one format, and the exported student is
rebuilt from its manifest's architecture record like any other.

- ``"smtl"``: :class:`SMTLNet`, Safe Multi-Task Learning (Guo, Ye & Zhang, arXiv 2111.10601;
  reference code ``Pengxin-Guo/SMTL``, ``nyu/backbone.py``).
- ``"pdf"``: :class:`~unirep.models.fusion.ProgressiveDecoderNet`, progressive decoder fusion
  (Gurulingan, Arani & Zonooz, CoLLAs 2022): the decoders' first blocks shared by the tasks
  whose representations there are alike, decided stage by stage
  (:mod:`unirep.pipeline.progressive`).
- ``"automtl"``: :class:`~unirep.models.automtl.AutoMTLNet`, learned per-layer sharing in the
  spirit of AutoMTL (Zhang, Liu & Guan, NeurIPS 2022): each task chooses, at every convolution
  of the encoder, the shared operator, its own copy or a skip; searched, then fixed and
  retrained (:mod:`unirep.pipeline.branching`).
- ``"disparse"``: :class:`~unirep.models.pruning.DiSparseNet`, the shared-encoder network pruned
  per task by DiSparse's unanimous rule (Sun et al., CVPR 2022; :mod:`unirep.pipeline.pruning`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from unirep.models.adapters import ADAPTERS
from unirep.models.automtl import AutoMTLNet
from unirep.models.dense import (
    DenseAligner,
    DenseHead,
    DenseMultiTaskNet,
    PyramidDecoder,
    _align_conv,
)
from unirep.models.fusion import ProgressiveDecoderNet
from unirep.models.gates import GATES, PATHS, SMTLGates
from unirep.models.network import FeatureAligner, MultiDomainNet
from unirep.models.pruned_auxiliary import PrunedAuxiliaryNet
from unirep.models.pruning import DiSparseNet
from unirep.registry import Registry

SHARING: Registry[nn.Module] = Registry("student sharing")
SHARING.register("pdf")(ProgressiveDecoderNet)
SHARING.register("automtl")(AutoMTLNet)
SHARING.register("disparse")(DiSparseNet)

DISTILL_FROM = ("mixed", "private")


def check_smtl_arguments(
    gate: str = "softmax",
    tau: float = 0.1,
    after_decoders: bool = False,
    distill_from: str = "mixed",
    selected: dict[str, str] | None = None,
    seed: int = 0,
) -> None:
    """Raise ``ValueError`` naming the argument for an SMTL setting that cannot be built."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {', '.join(GATES)}, got {gate!r}")
    if not tau > 0:
        raise ValueError(f"tau (the Lite gate's Gumbel temperature) must be > 0, got {tau}")
    if distill_from not in DISTILL_FROM:
        raise ValueError(
            f"distill_from must be one of {', '.join(DISTILL_FROM)}, got {distill_from!r}"
        )
    if selected is not None:
        if gate != "lite":
            raise ValueError("selected (a fixed choice per task) is only for the lite gate")
        bad = {t: p for t, p in selected.items() if p not in PATHS}
        if bad:
            raise ValueError(f"selected maps tasks to {' or '.join(PATHS)}, got {bad}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


class GatedSharing(abc.ABC):
    """What SMTL's dense and multi-domain students share around their :class:`SMTLGates`
    (``self.gates``, ``gate``, ``tau``, ``distill_from``, ``seed``, ``selected``): the settings
    they were built with, the training log of the gates, ``metrics.json``'s record and the Lite
    export. A subclass rebuilds itself with other settings in :meth:`rebuilt`."""

    gates: SMTLGates
    gate: str
    tau: float
    distill_from: str
    seed: int
    selected: dict[str, str] | None
    after_decoders: bool = False
    training: bool

    @abc.abstractmethod
    def rebuilt(self, settings: dict[str, Any]) -> nn.Module:
        """The same network built with ``settings`` (its ``sharing_kwargs``)."""

    def chosen(self) -> dict[str, str]:
        """``{name: "public" | "private"}``: the Lite gate's evaluation choice (``σ(a) ≥ 0.5``
        picks the private path), or the fixed one."""
        return self.gates.chosen()

    def settings(self) -> dict[str, Any]:
        """The keyword arguments this network was built with (its architecture record's
        ``sharing_kwargs``)."""
        record: dict[str, Any] = {
            "gate": self.gate,
            "tau": self.tau,
            "distill_from": self.distill_from,
            "seed": self.seed,
        }
        if self.selected is not None:
            record["selected"] = dict(self.selected)
        return record

    def gate_log(self) -> dict[str, Tensor]:
        """``{"gate/<name>": α²}``, each task's (domain's) weight on its private path as
        evaluation uses it (for the Lite gate: the probability σ(a) of picking it), for the
        training log; empty for a fixed network."""
        if self.selected is not None:
            return {}
        private = self.gates.private_weight()
        return {f"gate/{n}": private[i] for i, n in enumerate(self.gates.names)}

    def sharing_record(self) -> dict[str, Any]:
        """What ``metrics.json`` says of the sharing: the gate, its (α¹ public, α² private) per
        task as evaluation uses them and, for the Lite gate, the path each task picked."""
        was_training = self.gates.training
        self.gates.eval()
        with torch.no_grad():
            weights = self.gates()
        self.gates.train(was_training)
        record: dict[str, Any] = {
            "name": "smtl",
            "gate": self.gate,
            "after_decoders": self.after_decoders,
            "distill_from": self.distill_from,
            "weights": {n: [float(w) for w in weights[i]] for i, n in enumerate(self.gates.names)},
        }
        if self.gate == "lite":
            record["chosen"] = self.chosen()
        return record

    def exported(self, architecture: dict[str, Any]) -> tuple[dict[str, Any], nn.Module]:
        """(architecture record, network) to export. A Lite network becomes the fixed network of
        its evaluation choice (:meth:`chosen`): the encoders (backbones), decoders and heads no
        task picks are dropped, the gates too, and the record holds ``selected``; its
        predictions equal this network's in evaluation. Other gates export as they are."""
        if self.gate != "lite" or self.selected is not None:
            return architecture, self  # type: ignore[return-value]
        settings = {
            **architecture.get("sharing_kwargs", {}),
            **self.settings(),
            "selected": self.chosen(),
        }
        fixed = self.rebuilt(settings)
        state = self.state_dict()  # type: ignore[attr-defined]
        fixed.load_state_dict({k: state[k] for k in fixed.state_dict()}, strict=True)
        return {**architecture, "sharing_kwargs": settings}, fixed.train(self.training)


@SHARING.register("smtl")
class SMTLNet(GatedSharing, DenseMultiTaskNet):
    """Safe Multi-Task Learning: a public encoder, and per task a private encoder and a gate.

    For images ``[B, 3, H, W]``, the public encoder ``E_s`` and each task's private encoder
    ``E_t`` give stage features ``[B, C_i, H_i, W_i]``. Task ``t`` reads, at every stage,
    ``h_t = α_t¹ · E_s(x) + α_t² · E_t(x)`` through its own decoder and head (Guo, Ye & Zhang,
    arXiv 2111.10601, eq. 1); with ``after_decoders`` (the reference's ``SMTLmodel_new``) each
    path has its own decoder and head and the gate mixes their outputs:
    ``out_t = α_t¹ · D_t^s(E_s(x)) + α_t² · D_t^p(E_t(x))``.

    Gates (the reference's three versions, one learnable pair per task, ``a_t = 0`` at start):

    - ``softmax``: ``α_t = softmax(a_t)`` (0.5 / 0.5 at start);
    - ``sigmoid``: ``α_t = sigmoid(a_t)``, each coordinate in [0, 1] on its own;
    - ``lite``: one logit ``a_t`` per task; in training a hard Gumbel-softmax with the
      straight-through gradient on ``[1 − σ(a_t), σ(a_t)]`` at temperature ``tau`` (0.1 in the
      reference); in evaluation ``σ(a_t) ≥ 0.5`` picks the private encoder, otherwise the public
      one, and only the picked encoder runs. :meth:`exported` then drops every encoder no task
      picks (the storage saving of SMTL-Lite). The Gumbel noise is drawn from ``seed`` and a
      draw counter kept as a buffer, so a resumed run draws the same noise and every process of
      a distributed run draws the same (DDP broadcasts the buffer).

    ``selected`` (``{task: "public" | "private"}``) fixes the Lite choice: the network then holds
    only the picked encoders, decoders and heads, no gates: what :meth:`exported` returns.

    Distillation: the ``"bottleneck"`` a task's alignment adapter reads is the gated last-stage
    feature (``distill_from="mixed"``) or the task's private encoder's own
    (``distill_from="private"``: the teacher's knowledge goes to the private encoder). The public
    encoder is :attr:`trunk`, the part every task's loss reaches (what gradient weightings and
    :meth:`representation` use).

    Forward: as :class:`~unirep.models.dense.DenseMultiTaskNet` (``{task: {"pred", "features",
    "bottleneck"}}``); :meth:`gate_weights` gives the (α¹, α²) of every task.
    """

    def __init__(
        self,
        encoder: Callable[[], nn.Module],
        tasks: dict[str, int],
        decoder_channels: int = 64,
        unit_vector: Iterable[str] = (),
        gate: str = "softmax",
        tau: float = 0.1,
        after_decoders: bool = False,
        distill_from: str = "mixed",
        selected: dict[str, str] | None = None,
        seed: int = 0,
    ) -> None:
        check_smtl_arguments(gate, tau, after_decoders, distill_from, selected, seed)
        if selected is not None and set(selected) != set(tasks):
            raise ValueError(f"selected names tasks {sorted(selected)}, the network {list(tasks)}")
        super().__init__(encoder(), tasks, decoder_channels, unit_vector=unit_vector)
        self.gate = gate
        self.tau = float(tau)
        self.after_decoders = bool(after_decoders)
        self.distill_from = distill_from
        self.selected = dict(selected) if selected is not None else None
        self.seed = int(seed)
        self._encoder = encoder
        names = list(tasks)
        uses = self.selected or {t: "both" for t in names}
        private = [t for t in names if uses[t] != "public"]
        self.private = nn.ModuleDict({t: encoder() for t in private})
        channels = list(self.channels)
        if self.after_decoders:
            self.private_decoders = nn.ModuleDict(
                {t: PyramidDecoder(channels, decoder_channels) for t in private}
            )
            self.private_heads = nn.ModuleDict(
                {t: DenseHead(decoder_channels, tasks[t]) for t in private}
            )
            public_path = [t for t in names if uses[t] != "private"]
            for t in set(names) - set(public_path):  # their public path is never used
                del self.decoders[t], self.heads[t]
        self.gates = SMTLGates(names, gate, tau, self.selected, seed)
        if all(p == "private" for p in uses.values()):
            self.encoder = None  # type: ignore[assignment]  # no task reads the public encoder
        self._names = names

    # ----------------------------------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        return list(self._names)

    @property
    def channels(self) -> list[int]:
        """The stage widths ``C_i`` of every encoder (public and private ones are alike)."""
        enc = self.encoder if self.encoder is not None else next(iter(self.private.values()))
        return list(enc.channels)  # type: ignore[arg-type]

    def gate_weights(self) -> Tensor:
        """``[T, 2]``: per task (in :attr:`tasks` order) the weights (α¹ public, α² private).

        A fixed network gives its one-hot choice; the Lite gate in evaluation gives the
        deterministic choice ``σ(a) ≥ 0.5``, in training a fresh hard Gumbel draw (the draw
        counter advances)."""
        return self.gates()

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "after_decoders": self.after_decoders}

    def rebuilt(self, settings: dict[str, Any]) -> nn.Module:
        return SMTLNet(
            self._encoder, self.task_channels, self.decoder_channels, self.unit_vector, **settings
        )

    def forward(self, inputs: dict[str, Tensor] | Tensor) -> dict[str, dict[str, Tensor]]:
        images = self.images_of(inputs)
        weights = self.gate_weights().to(images.device)
        hard = self.selected is not None or (self.gate == "lite" and not self.training)
        uses = {
            t: (not hard or bool(weights[i, 0] > 0), not hard or bool(weights[i, 1] > 0))
            for i, t in enumerate(self._names)
        }  # (reads public, reads private): a hard choice runs only the picked path
        public = self.encoder(images) if any(u[0] for u in uses.values()) else None
        out: dict[str, dict[str, Tensor]] = {}
        for i, task in enumerate(self._names):
            a_public, a_private = weights[i, 0], weights[i, 1]
            private = self.private[task](images) if uses[task][1] else None
            shared = public if uses[task][0] else None
            if self.after_decoders:
                feat, pred = self._after_decoders(task, shared, private, a_public, a_private)
            else:
                stages = _mix(shared, private, a_public, a_private)
                feat = self.decoders[task](stages)
                pred = self.heads[task](feat)
            pred = self.finish(task, pred, images.shape[-2:])
            if self.distill_from == "private" and private is not None:
                bottleneck = private[-1]
            else:
                bottleneck = _mix(
                    None if shared is None else shared[-1:],
                    None if private is None else private[-1:],
                    a_public,
                    a_private,
                )[0]
            out[task] = {"pred": pred, "features": feat, "bottleneck": bottleneck}
        return out

    def _after_decoders(
        self,
        task: str,
        public: list[Tensor] | None,
        private: list[Tensor] | None,
        a_public: Tensor,
        a_private: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """(mixed decoder features ``[B, D, H_0, W_0]``, mixed head output ``[B, K, H_0, W_0]``)
        of the "gates after decoders" variant; a path not run contributes nothing."""
        feats, preds = [], []
        if public is not None:
            f = self.decoders[task](public)
            feats.append(a_public * f)
            preds.append(a_public * self.heads[task](f))
        if private is not None:
            f = self.private_decoders[task](private)
            feats.append(a_private * f)
            preds.append(a_private * self.private_heads[task](f))
        return sum(feats[1:], feats[0]), sum(preds[1:], preds[0])

    def representation(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The public encoder's last stage ``{stream: [B, C_last, H_last, W_last]}`` (what every
        task shares); a Lite network whose tasks all picked their private encoder has none."""
        if self.encoder is None:
            raise ValueError(
                "this SMTL-Lite student has no public encoder (every task picked its private "
                "one), so it has no shared representation"
            )
        return super().representation(inputs)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The public encoder's trainable parameters: what every task's loss reaches."""
        if self.encoder is None:
            return []
        return super().shared_parameters()

    def build_aligners(
        self, teacher_dims: dict[str, int], adapter: str = "linear", **kwargs: Any
    ) -> nn.ModuleDict:
        """As :meth:`DenseMultiTaskNet.build_aligners`, from the stage widths of the encoders."""
        if adapter != "linear" or kwargs:
            raise ValueError(f"dense alignment adapters are linear 1x1 convs, got {adapter!r}")
        unknown = set(teacher_dims) - set(self.tasks)
        if unknown:
            raise KeyError(
                f"alignment adapters for unknown task(s) {sorted(unknown)}; tasks: {self.tasks}"
            )
        last = self.channels[-1]
        bottleneck = {t: _align_conv(last, d) for t, d in teacher_dims.items()}
        features = {t: _align_conv(self.decoder_channels, d) for t, d in teacher_dims.items()}
        return nn.ModuleDict({t: DenseAligner(bottleneck[t], features[t]) for t in teacher_dims})


def _mix(
    public: list[Tensor] | None, private: list[Tensor] | None, a_public: Tensor, a_private: Tensor
) -> list[Tensor]:
    """``[α¹ · p + α² · q]`` stage by stage; a path that was not run contributes nothing."""
    if public is None:
        assert private is not None
        return [a_private * q for q in private]
    if private is None:
        return [a_public * p for p in public]
    return [a_public * p + a_private * q for p, q in zip(public, private, strict=True)]


# --------------------------------------------------------------------------------------------
# Multi-domain classification

CLASSIFICATION_SHARING: Registry[nn.Module] = Registry("classification student sharing")
# tasks with partly overlapping label sets: per-task pruned subnetworks of an auxiliary network
# learnt on the union of their classes (two phases: unirep.pipeline.overlap)
CLASSIFICATION_SHARING.register("pruned_auxiliary")(PrunedAuxiliaryNet)


@CLASSIFICATION_SHARING.register("smtl")
class SMTLMultiDomainNet(GatedSharing, MultiDomainNet):
    """SMTL for multi-domain classification: a public backbone shared by every domain and, per
    domain, a private backbone and a gate (Guo, Ye & Zhang, arXiv 2111.10601, with the
    backbone's pooled features as the encoder's output).

    Domain ``d`` reads ``h_d = α_d¹ · B_s(x) + α_d² · B_d(x)`` (``[B_d, C]``) through its head;
    the gates are :class:`~unirep.models.gates.SMTLGates` (``softmax``, ``sigmoid``, ``lite``,
    as for :class:`SMTLNet`), and a Lite network exports without the backbones no domain picked
    (:meth:`exported`). ``backbone_state`` (the run's ``classification.init_from_teacher``)
    initialises the public backbone and every private one. With ``distill_from="private"`` the
    alignment adapters read each domain's private features (the teacher's knowledge goes to its
    domain's own backbone), else the gated ones.

    Forward: ``{domain: [B_d, 3, H, W]}`` → per domain ``{"features": h_d [B_d, C], "pred":
    [B_d, K_d], "private": [B_d, C]}`` (``private`` when the domain's private backbone ran).
    """

    def __init__(
        self,
        backbone: Callable[[], tuple[nn.Module, int]],
        num_classes: dict[str, int],
        backbone_state: dict[str, Tensor] | None = None,
        gate: str = "softmax",
        tau: float = 0.1,
        distill_from: str = "mixed",
        selected: dict[str, str] | None = None,
        seed: int = 0,
    ) -> None:
        check_smtl_arguments(gate, tau, False, distill_from, selected, seed)
        if selected is not None and set(selected) != set(num_classes):
            raise ValueError(
                f"selected names domains {sorted(selected)}, the network {list(num_classes)}"
            )

        def make() -> nn.Module:
            net, _ = backbone()
            if backbone_state is not None:
                net.load_state_dict(backbone_state, strict=True)
            return net

        public, dim = backbone()
        if backbone_state is not None:
            public.load_state_dict(backbone_state, strict=True)
        super().__init__(public, dim, num_classes)
        names = list(num_classes)
        uses = selected or dict.fromkeys(names, "both")
        self.private = nn.ModuleDict({d: make() for d in names if uses[d] != "public"})
        self.gate, self.tau, self.seed = gate, float(tau), int(seed)
        self.distill_from = distill_from
        self.selected = dict(selected) if selected is not None else None
        self.gates = SMTLGates(names, gate, tau, self.selected, seed)
        if all(p == "private" for p in uses.values()):
            self.backbone = None  # type: ignore[assignment]  # no domain reads the public one
        self._backbone = backbone
        self._domain_specific = False

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        unknown = set(inputs) - set(self.heads)
        if unknown:
            raise KeyError(f"no head for domain(s) {sorted(unknown)}; heads: {self.domains}")
        weights = self.gates()
        index = {d: i for i, d in enumerate(self.gates.names)}
        hard = self.selected is not None or (self.gate == "lite" and not self.training)
        reads = {
            d: (
                not hard or bool(weights[index[d], 0] > 0),
                not hard or bool(weights[index[d], 1] > 0),
            )
            for d in inputs
        }  # (public, private): a hard choice runs only the picked backbone
        public_in = {d: x for d, x in inputs.items() if reads[d][0]}
        public = self._shared_features(public_in) if public_in else {}
        out: dict[str, dict[str, Tensor]] = {}
        for d, x in inputs.items():
            w = weights[index[d]].to(x.device)
            private = self.private[d](x) if reads[d][1] else None
            parts = []
            if d in public:
                parts.append(w[0] * public[d])
            if private is not None:
                parts.append(w[1] * private)
            feat = sum(parts[1:], parts[0])
            out[d] = {"features": feat, "pred": self.heads[d](feat)}
            if private is not None:
                out[d]["private"] = private
        return out

    def representation(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The public backbone's pooled features ``{domain: [B_d, C]}``."""
        if self.backbone is None:
            raise ValueError(
                "this SMTL-Lite student has no public backbone (every domain picked its private "
                "one), so it has no shared representation"
            )
        return super().representation(inputs)

    @property
    def trunk(self) -> nn.Module:
        """The public backbone (None when a Lite export dropped it)."""
        return self.backbone

    def shared_parameters(self) -> list[nn.Parameter]:
        if self.backbone is None:
            return []
        return super().shared_parameters()

    def build_aligners(
        self, teacher_dims: dict[str, int], adapter: str = "linear", **kwargs: Any
    ) -> nn.ModuleDict:
        """As :meth:`MultiDomainNet.build_aligners`, reading the private features when
        ``distill_from="private"``."""
        key = "private" if self.distill_from == "private" else "features"
        return nn.ModuleDict(
            {
                d: FeatureAligner(
                    ADAPTERS.build(adapter, in_dim=self.feature_dim, out_dim=dim, **kwargs), key
                )
                for d, dim in teacher_dims.items()
            }
        )

    def rebuilt(self, settings: dict[str, Any]) -> nn.Module:
        classes = {d: head.out_features for d, head in self.heads.items()}
        return SMTLMultiDomainNet(self._backbone, classes, **settings)
