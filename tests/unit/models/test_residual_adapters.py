"""Parallel residual adapters (Rebuffi et al. 2018): identity at attach, domain routing, gradients,
errors, parameter report and state-dict round trip."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import unirep.models.resnet_decathlon  # noqa: F401  (registers the decathlon ResNets in timm)
from unirep.data.classification.decathlon import DECATHLON_DOMAINS
from unirep.models.residual_adapters import (
    DomainBatchNorm2d,
    ParallelAdapterConv,
    active_domain,
    adapter_parameter_report,
    attach_parallel_adapters,
    domain_specific_modules,
    set_domain,
)

DOMAINS = ["digits", "objects", "textures"]
DECATHLON = list(DECATHLON_DOMAINS)


def _tiny(domains: list[str] = DOMAINS, share_bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = timm.create_model("resnet_decathlon_tiny", num_classes=0)
    return attach_parallel_adapters(net, domains, share_bn=share_bn)


def _randomise_bn_stats(net: nn.Module) -> None:
    """Non-trivial running statistics and affine weights, so BN copies are really tested."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)


@pytest.mark.parametrize(
    ("name", "size"),
    [("resnet_decathlon_tiny", 32), ("resnet26_decathlon", 32), ("resnet18", 32)],
)
def test_attaching_keeps_the_function(name: str, size: int) -> None:
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        _randomise_bn_stats(net)
    n_conv3x3 = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in net.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before = net(x)
        attach_parallel_adapters(net, DOMAINS)
        assert sum(isinstance(m, ParallelAdapterConv) for m in net.modules()) == n_conv3x3
        assert sum(isinstance(m, DomainBatchNorm2d) for m in net.modules()) == n_bn
        for domain in DOMAINS:
            with active_domain(net, domain):
                torch.testing.assert_close(net(x), before)


def test_share_bn_keeps_plain_batch_norms() -> None:
    net = _tiny(share_bn=True)
    assert not any(isinstance(m, DomainBatchNorm2d) for m in net.modules())
    assert any(isinstance(m, ParallelAdapterConv) for m in net.modules())


def test_domains_differ_after_perturbing_one_adapter() -> None:
    net = _tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    first = next(m for m in net.modules() if isinstance(m, ParallelAdapterConv))
    with torch.no_grad():
        first.adapters["objects"].weight.normal_()
        set_domain(net, "digits")
        digits = net(x)
        set_domain(net, "textures")
        textures = net(x)
        set_domain(net, "objects")
        objects = net(x)
    torch.testing.assert_close(digits, textures)
    assert not torch.allclose(digits, objects)


def test_gradients_reach_only_the_active_domain() -> None:
    net = _tiny().train()
    with active_domain(net, "digits"):
        net(torch.randn(4, 3, 32, 32)).square().mean().backward()
    for m in net.modules():
        if isinstance(m, ParallelAdapterConv):
            assert m.conv.weight.grad is not None and m.conv.weight.grad.abs().sum() > 0
            assert m.adapters["digits"].weight.grad.abs().sum() > 0  # zero init still learns
            for other in ("objects", "textures"):
                grad = m.adapters[other].weight.grad
                assert grad is None or not grad.any()
        if isinstance(m, DomainBatchNorm2d):
            assert m.norms["digits"].weight.grad is not None
            for other in ("objects", "textures"):
                assert m.norms[other].weight.grad is None


def test_training_updates_only_the_active_bn_statistics() -> None:
    net = _tiny().train()
    with active_domain(net, "objects"):
        net(torch.randn(4, 3, 32, 32))
    bn = next(m for m in net.modules() if isinstance(m, DomainBatchNorm2d))
    assert bn.norms["objects"].num_batches_tracked.item() == 1
    assert bn.norms["digits"].num_batches_tracked.item() == 0


def test_missing_and_unknown_domain_errors_name_the_valid_ones() -> None:
    net = _tiny()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(RuntimeError, match=r"no active domain.*'digits', 'objects', 'textures'"):
        net(x)
    with pytest.raises(KeyError, match=r"'photos'.*'digits', 'objects', 'textures'"):
        set_domain(net, "photos")
    with pytest.raises(KeyError, match="photos"), active_domain(net, "photos"):
        pass
    with pytest.raises(ValueError, match="attach_parallel_adapters"):
        set_domain(timm.create_model("resnet_decathlon_tiny", num_classes=0), "digits")


def test_active_domain_restores_the_previous_one() -> None:
    net = _tiny()
    set_domain(net, "digits")
    with active_domain(net, "textures"):
        assert {m.domain for m in domain_specific_modules(net)} == {"textures"}
        with active_domain(net, "objects"):
            pass
        assert {m.domain for m in domain_specific_modules(net)} == {"textures"}
    assert {m.domain for m in domain_specific_modules(net)} == {"digits"}


def test_attach_refuses_bad_domains_and_double_attachment() -> None:
    net = timm.create_model("resnet_decathlon_tiny", num_classes=0)
    with pytest.raises(ValueError, match="duplicate"):
        attach_parallel_adapters(net, ["a", "a"])
    with pytest.raises(ValueError, match="at least one"):
        attach_parallel_adapters(net, [])
    attach_parallel_adapters(net, ["a"])
    with pytest.raises(ValueError, match="already"):
        attach_parallel_adapters(net, ["b"])
    with pytest.raises(ValueError, match="same"):
        ParallelAdapterConv(nn.Conv2d(4, 4, 3, padding=0), ["a"])


def test_parameter_report_on_resnet26_with_ten_domains() -> None:
    net = timm.create_model("resnet26_decathlon", num_classes=0)
    plain = sum(p.numel() for p in net.parameters())
    conv3x3 = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Conv2d))
    bn = sum(
        p.numel() for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    )
    report = adapter_parameter_report(attach_parallel_adapters(net, DECATHLON))
    per_domain = [report[f"domain/{d}"] for d in DECATHLON]
    assert len(report) == len(DECATHLON) + 2
    assert report["total"] == report["shared"] + sum(per_domain)
    assert report["total"] == sum(p.numel() for p in net.parameters())
    # every conv of this ResNet is 3×3, so shared = those convs and each domain = 1/9 of them + BNs
    assert report["shared"] == conv3x3 == plain - bn
    assert per_domain == [conv3x3 // 9 + bn] * len(DECATHLON)
    assert report["shared"] == 5_806_944 and per_domain[0] == 652_960
    assert 2.0 < report["total"] / plain < 2.2  # the "2×" of the decathlon tables


def test_state_dict_round_trip_strict() -> None:
    source = _tiny().eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
        _randomise_bn_stats(source)
    target = _tiny().eval()
    target.load_state_dict(source.state_dict(), strict=True)
    assert any(".adapters.objects." in k for k in source.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for domain in DOMAINS:
            with active_domain(source, domain), active_domain(target, domain):
                torch.testing.assert_close(target(x), source(x))
