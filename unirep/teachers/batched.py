"""Frozen teachers of one architecture evaluated as one call (``teachers.batched``).

A run's teachers are single-task networks of one architecture (:func:`unirep.teachers.store.freeze`:
eval mode, no gradients), so the parts whose parameters have the same names and shapes in every
teacher can run together: ``torch.func.stack_module_state`` stacks each part's parameters and
buffers along a new leading teacher dimension ``T``, and ``torch.vmap`` of
``torch.func.functional_call`` maps the part over it. Under ``vmap`` a convolution over stacked
weights becomes one grouped convolution (or, on an input all teachers share, one convolution with
``T`` times the output channels): ``T`` small calls become one larger one. Batch-norm uses its
running statistics, as in eval mode one by one.

What runs batched, per teacher network:

- a classification teacher (:class:`~unirep.models.network.MultiDomainNet`, one domain): the
  backbone; its linear head (the domain's classes) runs one by one;
- a dense teacher (:class:`~unirep.models.dense.DenseMultiTaskNet`, one task, no cross-task
  module): the encoder, the decoder and every block of the head but its last 1×1 conv (the
  task's output channels), which runs one by one, as do the upsampling and normalisation.

Teachers whose inputs cannot be stacked together (another image size or batch size: a
classification domain's stream may differ from the others'), a teacher alone of its shape, and
any other network (per-domain residual adapters, cross-task modules) run one by one, as
:func:`each_teacher` runs them all. The outputs equal the one-by-one path's to float rounding
(``tests/unit/teachers/test_batched.py``; on an H100 they were bit-identical in float32, and within
2e-4 with cuDNN's default TF32 convolutions, which round the grouped and the plain convolutions
differently). The stacked weights are copies: the batched parts of the teachers' weights are
held twice.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

from unirep.errors import ConfigError
from unirep.models.dense import DenseMultiTaskNet
from unirep.models.network import MultiDomainNet
from unirep.tasks import Task

TEACHER_AUTOCAST: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""``teachers.autocast`` values and their dtype (null: the run's ``mixed_precision``)."""

Outputs = dict[str, dict[str, Tensor]]  # {task: {"pred", "features", ...}}


def teacher_autocast_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """The dtype ``teachers.autocast`` asks for on ``device`` (None: the run's mixed precision);
    a :class:`~unirep.config.schema.ConfigError` naming the key where the device cannot autocast
    it."""
    if name is None:
        return None
    if name not in TEACHER_AUTOCAST:
        raise ConfigError(
            f"config key 'teachers.autocast': {name!r} is not valid; choices: null, "
            f"{', '.join(TEACHER_AUTOCAST)}"
        )
    dtype = TEACHER_AUTOCAST[name]
    usable = torch.amp.autocast_mode.is_autocast_available(device.type)
    if usable and device.type == "cuda" and dtype is torch.bfloat16:
        usable = torch.cuda.is_bf16_supported()
    if not usable:
        raise ConfigError(
            f"config key 'teachers.autocast': {name!r} is not supported on {device.type} by "
            f"torch {torch.__version__}; set teachers.autocast=null (the run's mixed precision)"
        )
    return dtype


def each_teacher(
    teachers: dict[str, nn.Module], tasks: dict[str, Task], inputs: dict[str, Tensor]
) -> Outputs:
    """``{task: outputs}`` of each teacher on its task's stream, one call per teacher (teachers
    whose stream is not in ``inputs`` are left out)."""
    out = {}
    for name, net in teachers.items():
        stream = tasks[name].stream
        if stream in inputs:
            out[name] = net({stream: inputs[stream]})[name]
    return out


class StackedModules:
    """Modules with the same parameter and buffer names and shapes, one per teacher, as one
    vmapped call over their stacked weights (the first module is the template).

    Autocast does not reach a convolution inside ``torch.vmap`` (it is decomposed before
    autocast sees it), and batch-norm under ``vmap`` takes a single dtype; so under autocast the
    call runs wholly in autocast's dtype: input, weights and batch-norm statistics (cast once
    per dtype and kept: teachers are frozen). Within the tolerance of autocast's own result.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self.template = modules[0]
        self.params, self.buffers = stack_module_state(modules)  # {name: [T, ...]}
        self.cast: dict[torch.dtype, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}

    def _state(self, dtype: torch.dtype | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The stacked parameters and buffers, their floating tensors in ``dtype`` (None: as
        they are)."""
        if dtype is None:
            return self.params, self.buffers
        if dtype not in self.cast:

            def cast(state: dict[str, Tensor]) -> dict[str, Tensor]:
                return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

            self.cast[dtype] = (cast(self.params), cast(self.buffers))
        return self.cast[dtype]

    def __call__(self, inputs: Any, shared: bool = False) -> Any:
        """The modules' outputs stacked ``[T, ...]``; ``inputs`` stacked ``[T, ...]`` (a tensor
        or a list of them), or one input all modules read when ``shared``."""

        def one(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Any) -> Any:
            return functional_call(self.template, (params, buffers), (x,))

        device = next(iter(self.params.values())).device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        params, buffers = self._state(dtype)
        if dtype is not None:
            inputs = [x.to(dtype) for x in inputs] if isinstance(inputs, list) else inputs.to(dtype)
        in_dims = (0, 0, None if shared else 0)
        return torch.vmap(one, in_dims=in_dims)(params, buffers, inputs)


def _signature(module: nn.Module) -> tuple[Any, ...]:
    """What must agree for modules to be stacked: their layers, and their tensors' names,
    shapes, dtypes and devices."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return (
        tuple(type(m).__name__ for m in module.modules()),
        tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in tensors),
    )


def _head_body(head: nn.Module) -> nn.Sequential:
    """A dense head without its output conv (the blocks every task's head has alike)."""
    return nn.Sequential(*list(head)[:-1])


def _batched_parts(net: nn.Module, task: str) -> list[nn.Module] | None:
    """The parts of ``task``'s teacher that run batched, in order; None: it runs alone."""
    if isinstance(net, MultiDomainNet) and net.tasks == [task] and not net.domain_specific:
        return [net.backbone]
    if (
        isinstance(net, DenseMultiTaskNet)
        and net.tasks == [task]
        and net.attention is None
        and net.exchange is None
    ):
        return [net.encoder, net.decoders[task], _head_body(net.heads[task])]
    return None


class TeacherGroup:
    """Teachers of one architecture whose inputs stack: their batched parts as one call each."""

    def __init__(self, nets: dict[str, nn.Module], parts: dict[str, list[nn.Module]]) -> None:
        self.nets = nets
        names = list(nets)
        self.stacks = [
            StackedModules([parts[t][i] for t in names]) for i in range(len(parts[names[0]]))
        ]

    def __call__(self, images: list[Tensor]) -> Outputs:
        """The group's outputs on ``images`` (one ``[B, 3, H, W]`` per teacher, in order; the
        same tensor for all when they read one stream)."""
        shared = all(x is images[0] for x in images)
        x = images[0] if shared else torch.stack(images)
        first = next(iter(self.nets.values()))
        if isinstance(first, MultiDomainNet):
            (backbone,) = self.stacks
            feats = backbone(x, shared)  # [T, B, C]
            return {
                t: {"features": f, "pred": net.heads[t](f)}
                for (t, net), f in zip(self.nets.items(), feats, strict=True)
            }
        encoder, decoder, head_body = self.stacks
        stages = encoder(x, shared)  # [T, B, C_i, H_i, W_i] per stage
        feats = decoder(stages)  # [T, B, D, H_0, W_0]
        hidden = head_body(feats)
        out = {}
        # the rest of DenseMultiTaskNet.forward for one task, one teacher at a time
        for i, (t, net) in enumerate(self.nets.items()):
            pred = net.heads[t][-1](hidden[i])
            size = images[i].shape[-2:]
            pred = F.interpolate(pred, size=size, mode="bilinear", align_corners=False)
            if t in net.unit_vector:
                pred = F.normalize(pred, p=2, dim=1)
            out[t] = {"pred": pred, "features": feats[i], "bottleneck": stages[-1][i]}
        return out


class BatchedTeachers:
    """The phase's frozen teachers, those of one architecture and one input shape evaluated as
    one call (:class:`TeacherGroup`), the others one by one (:func:`each_teacher`).

    ``BatchedTeachers(teachers, tasks)(inputs)`` returns what ``each_teacher(teachers, tasks,
    inputs)`` returns, in the same order. Groups are formed on each call from the shapes of the
    inputs present (a group's stacked weights are built on its first call and kept).
    """

    def __init__(self, teachers: dict[str, nn.Module], tasks: dict[str, Task]) -> None:
        self.teachers = teachers
        self.tasks = tasks
        self.parts: dict[str, list[nn.Module]] = {}
        self.kinds: dict[str, tuple[Any, ...]] = {}  # task -> what must agree to be batched
        for name, net in teachers.items():
            parts = _batched_parts(net, name)
            if parts is not None:
                self.parts[name] = parts
                self.kinds[name] = (type(net), *(_signature(p) for p in parts))
        self.groups: dict[tuple[str, ...], TeacherGroup] = {}

    def __call__(self, inputs: dict[str, Tensor]) -> Outputs:
        present = [t for t in self.teachers if self.tasks[t].stream in inputs]
        together: dict[tuple[Any, ...], list[str]] = {}
        alone = []
        for t in present:
            x = inputs[self.tasks[t].stream]
            if t in self.kinds:
                key = (self.kinds[t], tuple(x.shape), x.dtype, x.device)
                together.setdefault(key, []).append(t)
            else:
                alone.append(t)
        out: Outputs = {}
        for names in together.values():
            if len(names) == 1:
                alone += names
                continue
            group = self.groups.get(tuple(names))
            if group is None:
                nets = {t: self.teachers[t] for t in names}
                group = self.groups[tuple(names)] = TeacherGroup(nets, self.parts)
            out.update(group([inputs[self.tasks[t].stream] for t in names]))
        out.update(each_teacher({t: self.teachers[t] for t in alone}, self.tasks, inputs))
        return {t: out[t] for t in present}
