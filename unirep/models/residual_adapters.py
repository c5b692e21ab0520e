"""Parallel residual adapters: per-domain 1×1 convolutions and batch norms inside a shared backbone.

Rebuffi, Bilen & Vedaldi, "Efficient parametrization of multi-domain deep neural networks"
(CVPR 2018), as used by the "URL (RA)" student of Universal Representations (Li, Liu & Bilen,
IJCV 2023). Every 3×3 convolution ``W`` of the backbone gets, per domain ``d``, a parallel 1×1
convolution ``A_d`` with the same input/output channels and stride, so the layer computes
``y = W * x + A_d * x``; every ``BatchNorm2d`` becomes one copy per domain. Unlike the alignment
adapters of :mod:`unirep.models.adapters`, these stay in the model at test time, so the student
needs the domain of its input: it is chosen by :func:`set_domain` or :func:`active_domain`.

Typical use: build the backbone, load its (shared) weights, then attach::

    net = timm.create_model("resnet26_decathlon", num_classes=0)
    attach_parallel_adapters(net, ["imagenet12", "cifar100"])
    with active_domain(net, "cifar100"):
        feats = net(images)  # [B, 256]

Attaching copies each BN (weights and running statistics) into every domain and zero-initialises
every adapter, so the adapted network computes exactly the function of the plain one until it is
trained. A batch must come from one domain; a forward touches only that domain's adapters and BNs,
so under DDP the others are unused parameters (``find_unused_parameters=True``).
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeGuard

from torch import Tensor, nn


class DomainSpecificModule(nn.Module, abc.ABC):
    """A module with one sub-module per domain, of which the active one (``self.domain``) runs.

    ``domain`` is a plain attribute (``None`` until set), written by :func:`set_domain`; no
    module-level state is involved, so several adapted models can be active on different domains.
    """

    domain: str | None

    def __init__(self) -> None:
        super().__init__()
        self.domain = None

    @property
    @abc.abstractmethod
    def per_domain(self) -> nn.ModuleDict:
        """The per-domain sub-modules, keyed by domain name."""

    @property
    def domains(self) -> list[str]:
        """The valid domain names, in attachment order."""
        return list(self.per_domain.keys())

    def _active(self) -> nn.Module:
        """The active domain's sub-module; a clear error when none is set or it is unknown."""
        if self.domain is None:
            raise RuntimeError(
                f"{type(self).__name__} has no active domain; call set_domain(model, domain) or "
                f"use `with active_domain(model, domain):`, with domain one of {self.domains}"
            )
        if self.domain not in self.per_domain:
            raise KeyError(f"unknown domain {self.domain!r}; valid domains: {self.domains}")
        return self.per_domain[self.domain]

    def extra_repr(self) -> str:
        return f"domains={self.domains}, domain={self.domain!r}"


class ParallelAdapterConv(DomainSpecificModule):
    """A shared 3×3 convolution plus a parallel per-domain 1×1 convolution (Rebuffi et al. 2018).

    ``forward(x)``: ``[B, C_in, H, W]`` → ``conv(x) + adapters[domain](x)``, ``[B, C_out, H', W']``.
    Each adapter has the conv's channels and stride, no padding and no bias; for a "same"-padded
    3×3 conv (padding = dilation) both branches give the same ``H' × W'``. Adapters are dense
    (``groups=1``) even when the wrapped conv is grouped.

    Adapters start at zero, so attaching them leaves the network's function unchanged (the
    pretrained or distilled backbone is the starting point for every domain). Training is not
    stalled by the zero start: an adapter is linear in its weight, whose gradient
    ``dL/dA = dL/dy ⊗ x`` does not depend on ``A``.
    """

    def __init__(self, conv: nn.Conv2d, domains: list[str]) -> None:
        super().__init__()
        _check_same_padding(conv)
        self.conv = conv
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.adapters = nn.ModuleDict(
            {
                d: nn.Conv2d(
                    conv.in_channels, conv.out_channels, 1, conv.stride, 0, bias=False, **factory
                )
                for d in domains
            }
        )
        for adapter in self.adapters.values():
            nn.init.zeros_(adapter.weight)

    @property
    def per_domain(self) -> nn.ModuleDict:
        return self.adapters

    def forward(self, x: Tensor) -> Tensor:
        adapter = self._active()
        shared = self.conv(x)
        residual = adapter(x)
        if shared.shape != residual.shape:
            raise RuntimeError(
                f"3×3 conv output {tuple(shared.shape)} and 1×1 adapter output "
                f"{tuple(residual.shape)} differ; parallel adapters need 'same' padding"
            )
        return shared + residual


class DomainBatchNorm2d(DomainSpecificModule):
    """One batch norm per domain, each a copy of the original (affine weights, running stats).

    ``forward(x)``: ``[B, C, H, W]`` → ``norms[domain](x)``, same shape; in training mode only the
    active domain's running statistics are updated.
    """

    def __init__(self, bn: nn.BatchNorm2d, domains: list[str]) -> None:
        super().__init__()
        self.norms = nn.ModuleDict({d: copy.deepcopy(bn) for d in domains})

    @property
    def per_domain(self) -> nn.ModuleDict:
        return self.norms

    def forward(self, x: Tensor) -> Tensor:
        return self._active()(x)


def _check_same_padding(conv: nn.Conv2d) -> None:
    """Refuse a conv whose output size a 1×1 conv with the same stride would not match."""
    if type(conv) is not nn.Conv2d:
        return  # subclasses (e.g. timm's dynamic "same" padding) are checked at forward time
    if isinstance(conv.padding, str):
        ok = conv.padding == "same"
    else:
        ok = all(
            2 * p == d * (k - 1)
            for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size, strict=True)
        )
    if not ok:
        raise ValueError(
            f"parallel adapters need a 'same'-padded conv (2·padding = dilation·(kernel - 1)); got "
            f"padding={conv.padding}, dilation={conv.dilation}"
        )


def _is_conv3x3(module: nn.Module) -> TypeGuard[nn.Conv2d]:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (3, 3)


def domain_specific_modules(model: nn.Module) -> Iterator[DomainSpecificModule]:
    """Every adapter conv and per-domain BN inside ``model``."""
    for module in model.modules():
        if isinstance(module, DomainSpecificModule):
            yield module


def attach_parallel_adapters(
    backbone: nn.Module, domains: list[str], share_bn: bool = False
) -> nn.Module:
    """Give ``backbone`` parallel residual adapters for ``domains``, in place; returns it.

    Every ``nn.Conv2d`` child with a 3×3 kernel becomes a :class:`ParallelAdapterConv` and, unless
    ``share_bn``, every ``nn.BatchNorm2d`` child a :class:`DomainBatchNorm2d`. Other layers (the
    7×7 stem of a torchvision-style ResNet, 1×1 shortcuts, linear heads) stay shared. A module
    reached by several paths is replaced once, so weight tying is kept. Load the backbone's
    weights before attaching: the shared convs and every domain's BN copy then start from them.
    """
    domains = list(domains)
    if not domains:
        raise ValueError("attach_parallel_adapters needs at least one domain")
    if len(set(domains)) != len(domains):
        raise ValueError(f"duplicate domain names in {domains}")
    bad = [d for d in domains if not d or "." in d]
    if bad:
        raise ValueError(f"domain names must be non-empty and contain no '.'; got {bad}")
    if next(domain_specific_modules(backbone), None) is not None:
        raise ValueError("this model already has domain-specific adapters or batch norms")

    replaced: dict[int, nn.Module] = {}

    def replace_children(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if id(child) in replaced:
                setattr(parent, name, replaced[id(child)])
                continue
            if _is_conv3x3(child):
                new: nn.Module = ParallelAdapterConv(child, domains)
            elif isinstance(child, nn.BatchNorm2d) and not share_bn:
                new = DomainBatchNorm2d(child, domains)
            else:
                replace_children(child)
                continue
            replaced[id(child)] = new
            setattr(parent, name, new)

    replace_children(backbone)
    return backbone


def set_domain(model: nn.Module, domain: str | None) -> None:
    """Make ``domain`` the active one in every adapter of ``model`` (``None`` clears it).

    Raises ``KeyError`` listing the valid domains if any adapter lacks ``domain`` (then nothing is
    changed), and ``ValueError`` if ``model`` has no adapters at all.
    """
    modules = list(domain_specific_modules(model))
    if not modules:
        raise ValueError("model has no parallel adapters; call attach_parallel_adapters first")
    if domain is not None:
        for module in modules:
            if domain not in module.per_domain:
                raise KeyError(f"unknown domain {domain!r}; valid domains: {module.domains}")
    for module in modules:
        module.domain = domain


@contextmanager
def active_domain(model: nn.Module, domain: str) -> Iterator[nn.Module]:
    """``with active_domain(model, d):`` runs ``model`` on domain ``d``, then restores each
    adapter's previous domain (also on error). Yields ``model``."""
    previous = {module: module.domain for module in domain_specific_modules(model)}
    set_domain(model, domain)
    try:
        yield model
    finally:
        for module, old in previous.items():
            module.domain = old


def adapter_parameter_report(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``shared``, ``domain/<name>`` for each domain, and ``total``.

    ``domain/<name>`` counts that domain's 1×1 adapters and BN copies; ``shared`` is everything
    else (the 3×3 convs, other convs, shared BNs, and any heads in ``model``), so
    ``total == shared + sum(domain/*)``. Buffers (BN running statistics) are not parameters and
    are not counted. ``total / shared`` is the "#par." multiple of the decathlon tables when
    ``model`` is the backbone alone.
    """
    per_domain: dict[str, int] = {}
    specific: set[int] = set()
    for module in domain_specific_modules(model):
        for domain, sub in module.per_domain.items():
            for p in sub.parameters():
                if id(p) not in specific:
                    specific.add(id(p))
                    per_domain[domain] = per_domain.get(domain, 0) + p.numel()
    total = sum(p.numel() for p in model.parameters())
    shared = sum(p.numel() for p in model.parameters() if id(p) not in specific)
    report = {"shared": shared}
    report.update({f"domain/{d}": n for d, n in per_domain.items()})
    report["total"] = total
    return report
