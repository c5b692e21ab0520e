"""Learned per-layer sharing in the spirit of AutoMTL (Zhang, Liu & Guan, "AutoMTL: A Programming
Framework for Automating Efficient Multi-Task Learning", NeurIPS 2022; code
``zhanglijun95/AutoMTL``).

AutoMTL turns any CNN backbone into a multi-task *supernet*: at every operator, each task
chooses between the shared operator, a task-specific copy and skipping it, the choice relaxed
with Gumbel-softmax and trained with the network under a penalty on what is not shared; the
chosen architecture is then fixed and retrained. Here the operators are the encoder's
convolutions (any encoder of :data:`~unirep.models.dense.DENSE_ENCODERS`, timm models included,
is converted module by module, :func:`convert`), skipping is offered only where a convolution
keeps the shape of its input, and every batch norm is per task (as in AdaShare and AutoMTL, so
that a task's statistics never mix with another's branch).

:class:`AutoMTLNet` is both networks: with ``choices=None`` the supernet (policy logits per
task and convolution), with ``choices`` the fixed multi-branch network it chose, holding only
the operators some task uses. :mod:`unirep.pipeline.branching` runs the search, then the
retraining, as two phases.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.models.dense import DenseMultiTaskNet
from unirep.models.gates import seeded_gumbel

CHOICES = ("shared", "specific", "skip")
"""A task's options at a convolution, in the order of the policy logits."""


def check_automtl_arguments(
    choices: dict[str, dict[str, str]] | None = None,
    tau: float = 1.0,
    penalty: float = 0.05,
    policy_lr: float = 0.01,
    seed: int = 0,
) -> None:
    """Raise ``ValueError`` naming the argument for a setting that cannot be used."""
    if not policy_lr > 0:
        raise ValueError(f"policy_lr must be > 0, got {policy_lr}")
    if not tau > 0:
        raise ValueError(f"tau (the Gumbel-softmax temperature) must be > 0, got {tau}")
    if not penalty >= 0:
        raise ValueError(f"penalty (the sharing cost's weight) must be >= 0, got {penalty}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    for layer, per_task in (choices or {}).items():
        bad = {t: c for t, c in per_task.items() if c not in CHOICES}
        if bad:
            raise ValueError(f"choices[{layer!r}] must be {', '.join(CHOICES)}, got {bad}")


def can_skip(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` maps its input to the same shape (so skipping it is an option)."""
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    keeps_size = p == "same" or all(
        pi == di * (ki - 1) // 2 and ki % 2 == 1 for ki, pi, di in zip(k, p, d, strict=True)
    )
    same = all(st == 1 for st in s) and keeps_size
    return conv.in_channels == conv.out_channels and conv.groups == 1 and same


class BranchedConv(nn.Module):
    """A convolution every task reaches through its own choice: shared, its copy, or skip.

    In the supernet each task ``t`` mixes the three with its weights ``w_t`` (:attr:`weights`,
    set by the network before it runs the encoder for ``t``): ``y = w¹·W(x) + w²·W_t(x) +
    w³·x``; a weight of exactly 0 skips its branch. In a fixed network (``choice``) the task
    runs its chosen branch only. Forward: ``[B, C, H, W]`` → ``[B, C', H', W']``.
    """

    def __init__(self, conv: nn.Conv2d, tasks: list[str], choice: dict[str, str] | None) -> None:
        super().__init__()
        self.skippable = can_skip(conv)
        self.choice = dict(choice) if choice is not None else None
        uses = set(self.choice.values()) if self.choice is not None else {"shared"}
        specific = [t for t in tasks if self.choice is None or self.choice[t] == "specific"]
        self.shared = conv if "shared" in uses else None
        self.specific = nn.ModuleDict({t: copy.deepcopy(conv) for t in specific})
        self.task: str | None = None
        self.weights: Tensor | None = None  # [3]: the active task's (shared, specific, skip)

    def specific_size(self) -> int:
        """Parameters a task-specific copy of this convolution adds."""
        conv = self.shared if self.shared is not None else next(iter(self.specific.values()), None)
        return 0 if conv is None else sum(p.numel() for p in conv.parameters())

    def forward(self, x: Tensor) -> Tensor:
        task = self.task
        if task is None:
            raise RuntimeError("BranchedConv runs inside AutoMTLNet, which sets the task")
        if self.choice is not None:
            pick = self.choice[task]
            if pick == "skip":
                return x
            return (self.shared if pick == "shared" else self.specific[task])(x)  # type: ignore[misc]
        w = self.weights
        assert w is not None and self.shared is not None
        out = w[0] * self.shared(x) + w[1] * self.specific[task](x)
        return out + w[2] * x if self.skippable else out


class TaskBatchNorm(nn.Module):
    """One copy of a ``BatchNorm2d`` per task; the active task's runs (``[B, C, H, W]``)."""

    def __init__(self, bn: nn.BatchNorm2d, tasks: list[str]) -> None:
        super().__init__()
        self.per_task = nn.ModuleDict({t: copy.deepcopy(bn) for t in tasks})
        self.task: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.task is None:
            raise RuntimeError("TaskBatchNorm runs inside AutoMTLNet, which sets the task")
        return self.per_task[self.task](x)


def convert(
    encoder: nn.Module, tasks: list[str], choices: dict[str, dict[str, str]] | None = None
) -> list[tuple[str, BranchedConv]]:
    """Replace, in place, every ``Conv2d`` of ``encoder`` by a :class:`BranchedConv` (with the
    layer's ``choices[name]`` when fixed) and every ``BatchNorm2d`` by a :class:`TaskBatchNorm`;
    returns ``[(name, branched conv)]`` in module order."""
    targets = [
        (name, module)
        for name, module in encoder.named_modules()
        if isinstance(module, nn.Conv2d | nn.BatchNorm2d)
    ]
    layers = []
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = encoder.get_submodule(parent_name) if parent_name else encoder
        if isinstance(module, nn.Conv2d):
            wrapped: nn.Module = BranchedConv(
                module, tasks, None if choices is None else choices[name]
            )
            layers.append((name, wrapped))
        else:
            wrapped = TaskBatchNorm(module, tasks)
        setattr(parent, attr, wrapped)
    return layers  # type: ignore[return-value]


class AutoMTLNet(DenseMultiTaskNet):
    """The encoder as an AutoMTL supernet (or the fixed network it chose), a decoder and a head
    per task.

    Each task runs the encoder with its own choices (``T`` encoder passes per batch), then its
    :class:`~unirep.models.dense.PyramidDecoder` and head, as
    :class:`~unirep.models.dense.DenseMultiTaskNet`.

    Supernet (``choices=None``): per convolution and task, policy logits ``a`` ``[3]`` (0 at
    start; ``skip`` masked out where the convolution changes the shape). Training draws the
    weights by Gumbel-softmax at temperature ``tau`` (soft; the noise from ``seed`` and a draw
    counter kept as a buffer, so resumed and distributed runs draw alike); evaluation uses the
    one-hot of ``argmax a``, which is what :meth:`fixed_choices` returns. :meth:`regularizer`
    is the sharing cost: ``penalty · Σ_t Σ_l P_t,l(specific) · |W_l| / |W|``, the expected share
    of the encoder's convolution weights that task-specific copies add, per task. The policy
    learns at ``policy_lr`` (:meth:`own_lr_groups`).

    Fixed (``choices={layer: {task: choice}}``): no policy; each convolution holds the shared
    operator only when some task uses it and a copy per task that chose ``specific``.

    Forward: as :class:`~unirep.models.dense.DenseMultiTaskNet`; the ``"bottleneck"`` of a task
    is its own last encoder stage.
    """

    def __init__(
        self,
        encoder: Callable[[], nn.Module],
        tasks: dict[str, int],
        decoder_channels: int = 64,
        unit_vector: Iterable[str] = (),
        choices: dict[str, dict[str, str]] | None = None,
        tau: float = 1.0,
        penalty: float = 0.05,
        policy_lr: float = 0.01,
        seed: int = 0,
    ) -> None:
        check_automtl_arguments(choices, tau, penalty, policy_lr, seed)
        super().__init__(encoder(), tasks, decoder_channels, unit_vector=unit_vector)
        self._names = list(tasks)
        self.tau, self.penalty, self.seed = float(tau), float(penalty), int(seed)
        self.policy_lr = float(policy_lr)
        if choices is not None:
            convs = [n for n, m in self.encoder.named_modules() if isinstance(m, nn.Conv2d)]
            if set(choices) != set(convs) or any(set(c) != set(tasks) for c in choices.values()):
                raise ValueError(
                    "choices must name every convolution of the encoder and every task "
                    f"({len(convs)} convolutions, tasks {list(tasks)})"
                )
        self.choices = choices
        layers = convert(self.encoder, self._names, choices)
        self.layer_names = [name for name, _ in layers]
        self._layers = [layer for _, layer in layers]
        sizes = torch.tensor([float(layer.specific_size()) for layer in self._layers])
        self.register_buffer("layer_share", sizes / sizes.sum().clamp_min(1), persistent=False)
        self._bns = [m for m in self.encoder.modules() if isinstance(m, TaskBatchNorm)]
        if choices is None:
            self.policy = nn.Parameter(torch.zeros(len(self._layers), len(self._names), 3))
            mask = torch.zeros(len(self._layers), 1, 3)
            for i, layer in enumerate(self._layers):
                if not layer.skippable:
                    mask[i, :, 2] = float("-inf")
            self.register_buffer("policy_mask", mask, persistent=False)
            self.register_buffer("policy_draws", torch.zeros((), dtype=torch.long))

    @property
    def tasks(self) -> list[str]:
        return list(self._names)

    def probabilities(self) -> Tensor:
        """``[L, T, 3]``: the policy's probabilities (softmax of the masked logits)."""
        return torch.softmax(self.policy + self.policy_mask, dim=-1)

    def policy_weights(self) -> Tensor:
        """``[L, T, 3]``: the weights the branches get in this forward (a Gumbel-softmax draw in
        training, the argmax one-hot in evaluation)."""
        logits = self.policy + self.policy_mask
        if not self.training:
            return F.one_hot(logits.argmax(-1), 3).to(logits.dtype)
        gumbel = seeded_gumbel(logits.shape, self.seed, int(self.policy_draws), logits.dtype)
        self.policy_draws += 1
        return torch.softmax((logits + gumbel.to(logits.device)) / self.tau, dim=-1)

    def fixed_choices(self) -> dict[str, dict[str, str]]:
        """``{layer: {task: choice}}``: the architecture the policy chose (its argmax)."""
        if self.choices is not None:
            return {k: dict(v) for k, v in self.choices.items()}
        picks = (self.policy + self.policy_mask).argmax(-1).tolist()
        return {
            name: {t: CHOICES[picks[i][j]] for j, t in enumerate(self._names)}
            for i, name in enumerate(self.layer_names)
        }

    def own_lr_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The policy learns at ``policy_lr`` (AdaShare's and AutoMTL's 0.01), the rest of the
        network at the run's rate."""
        return [([self.policy], self.policy_lr)] if self.choices is None else []

    def regularizer(self) -> Tensor | None:
        """The sharing cost of the supernet (None for a fixed network or ``penalty=0``)."""
        if self.choices is not None or self.penalty == 0:
            return None
        specific = self.probabilities()[:, :, 1]  # [L, T]
        return self.penalty * (specific * self.layer_share[:, None]).sum()

    def _run_encoder(self, images: Tensor, task: str, weights: Tensor | None) -> list[Tensor]:
        j = self._names.index(task)
        for i, layer in enumerate(self._layers):
            layer.task = task
            layer.weights = None if weights is None else weights[i, j]
        for bn in self._bns:
            bn.task = task
        return self.encoder(images)

    def forward(self, inputs: dict[str, Tensor] | Tensor) -> dict[str, dict[str, Tensor]]:
        images = self.images_of(inputs)
        weights = self.policy_weights() if self.choices is None else None
        out: dict[str, dict[str, Tensor]] = {}
        for task in self._names:
            stages = self._run_encoder(images, task, weights)
            feat = self.decoders[task](stages)
            pred = self.predict(task, feat, images.shape[-2:])
            out[task] = {"pred": pred, "features": feat, "bottleneck": stages[-1]}
        return out

    def representation(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-task encoders have no one shared representation."""
        raise ValueError(
            "an AutoMTL student's encoder differs per task: use its task outputs, not features"
        )

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared operators' parameters (what every task that chose them reaches)."""
        return [
            p for layer in self._layers if layer.shared is not None
            for p in layer.shared.parameters() if p.requires_grad
        ]  # fmt: skip

    @property
    def trunk(self) -> nn.Module:
        """The converted encoder (its shared operators and every task's own)."""
        return self.encoder

    def gate_log(self) -> dict[str, Tensor]:
        """``{"share/<task>": mean P(shared), "specific/<task>": ...}`` over the layers, for the
        training log; empty for a fixed network."""
        if self.choices is not None:
            return {}
        p = self.probabilities().detach().mean(0)  # [T, 3]
        logs = {}
        for j, t in enumerate(self._names):
            logs[f"policy/{t}/shared"] = p[j, 0]
            logs[f"policy/{t}/specific"] = p[j, 1]
            logs[f"policy/{t}/skip"] = p[j, 2]
        return logs

    def sharing_record(self) -> dict[str, Any]:
        """What ``metrics.json`` says of the sharing: each layer's choice per task and (for the
        supernet) the policy's probabilities."""
        record: dict[str, Any] = {
            "name": "automtl",
            "layers": list(self.layer_names),
            "choices": self.fixed_choices(),
        }
        if self.choices is None:
            record["probabilities"] = self.probabilities().detach().tolist()
        return record

    def fixed_architecture(self, architecture: dict[str, Any]) -> dict[str, Any]:
        """The architecture record of the fixed network this supernet chose."""
        kwargs = {**architecture.get("sharing_kwargs", {}), "choices": self.fixed_choices()}
        return {**architecture, "sharing_kwargs": kwargs}
