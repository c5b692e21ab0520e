"""Backbones, adapters and the multi-domain network: shapes, gradients, registry errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from unirep.io import load_weights
from unirep.models.adapters import ADAPTERS
from unirep.models.backbones import build_backbone
from unirep.models.build import count_parameters
from unirep.models.network import build_network
from unirep.objective import Objective
from unirep.pipeline.export import export_student, load_student
from unirep.pipeline.stage_two import parameter_counts
from unirep.registry import UnknownNameError
from unirep.tasks import TASK_KINDS, Task
from unirep.training.trainable import TrainableModule
from unirep.weighting import build_weighting


def test_decathlon_resnets_are_timm_models() -> None:
    net = timm.create_model("resnet26_decathlon", pretrained=False, num_classes=0)
    assert 5.5e6 < count_parameters(net) < 6.5e6  # "about 6 M" (Rebuffi et al. 2017)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 256)
    assert net.forward_features(torch.randn(1, 3, 72, 72)).shape == (1, 256, 9, 9)
    tiny = timm.create_model("resnet_decathlon_tiny", num_classes=7)
    assert tiny(torch.randn(3, 3, 28, 28)).shape == (3, 7)


def test_pretrained_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("resnet26_decathlon", pretrained=True)
    with pytest.raises(ValueError, match="pretrained"):
        build_backbone("resnet_decathlon_tiny", pretrained=True)


def test_any_timm_backbone_by_name() -> None:
    net, dim = build_backbone("resnet10t")
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_unknown_backbone_names_it() -> None:
    with pytest.raises(UnknownNameError, match="not_a_model"):
        build_backbone("not_a_model")


@pytest.mark.parametrize("name", ADAPTERS.names())
@pytest.mark.parametrize("shape", [(4, 16), (2, 16, 3, 3)])
def test_every_adapter_maps_and_gets_gradient(name: str, shape: tuple[int, ...]) -> None:
    out_dim = 16 if name == "identity" else 8
    adapter = ADAPTERS.build(name, in_dim=16, out_dim=out_dim)
    x = torch.randn(*shape, requires_grad=True)
    y = adapter(x)
    assert y.shape == (shape[0], out_dim, *shape[2:])
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for p in adapter.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_linear_adapter_starts_as_identity_when_square() -> None:
    x = torch.randn(5, 12)
    torch.testing.assert_close(ADAPTERS.build("linear", in_dim=12, out_dim=12)(x), x)


def test_network_outputs_per_domain_and_every_parameter_learns() -> None:
    net = build_network("resnet_decathlon_tiny", {}, {"a": 3, "b": 5})
    aligners = net.build_aligners({"a": 64, "b": 32}, "linear")
    images = {"a": torch.randn(4, 3, 28, 28), "b": torch.randn(2, 3, 28, 28)}
    out = net(images)
    aligned = {d: aligners[d](out[d]) for d in out}
    assert out["a"]["pred"].shape == (4, 3) and out["b"]["pred"].shape == (2, 5)
    assert [a.shape for a in aligned["a"]] == [(4, 64)]
    assert [a.shape for a in aligned["b"]] == [(2, 32)]
    loss = sum(o["pred"].square().mean() + aligned[d][0].square().mean() for d, o in out.items())
    loss.backward()
    for name, p in [*net.named_parameters(), *aligners.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # batched (same shape) and per-domain paths agree in eval mode
    net.eval()
    with torch.no_grad():
        together = net(images)["b"]["pred"]
        alone = net.classify(images["b"], "b")
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_export_holds_only_the_students_state(tmp_path: Path) -> None:
    """The phase's trainable module holds student, aligners, objective and weighting state; the
    export is the student's weights alone, and it loads back into the student's architecture."""
    arch = {"backbone": "resnet_decathlon_tiny", "backbone_kwargs": {}, "residual_adapters": False}
    tasks = {"a": Task("a", TASK_KINDS.build("classification"), "a", num_classes=3)}
    net = build_network("resnet_decathlon_tiny", {}, {"a": 3})
    aligners = net.build_aligners({"a": 32}, "linear")
    module = TrainableModule(
        net, Objective(tasks), build_weighting("uncertainty", list(tasks)), aligners
    )
    extra = {k for k in module.state_dict() if not k.startswith("student.")}
    assert any(k.startswith("aligners.") for k in extra)
    assert any(k.startswith("weighting.") for k in extra)
    export_student(
        tmp_path, module.student, preset="p", architecture=arch, tasks=tasks,
        preprocessing={"a": {}}, teachers={}, selection={},
    )  # fmt: skip
    state = load_weights(tmp_path / "model.safetensors")
    assert set(state) == set(net.state_dict())
    assert not any(
        k.split(".")[0] in {"student", "aligners", "objective", "weighting"} for k in state
    )
    assert count_parameters(net) == sum(
        v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k
    )
    parts = (net, aligners, module.weighting)
    assert count_parameters(module) == sum(count_parameters(m) for m in parts)
    loaded, _ = load_student(tmp_path)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    assert parameter_counts(net, {}, module) == {
        "student": count_parameters(net),
        "adapters": count_parameters(aligners),
        "teachers_total": 0,
    }


def test_unknown_domain_is_an_error() -> None:
    net = build_network("resnet_decathlon_tiny", {}, {"a": 3})
    with pytest.raises(KeyError, match="zzz"):
        net({"zzz": torch.randn(1, 3, 28, 28)})


def test_residual_adapter_network_forwards_each_domain_through_its_own_parts() -> None:
    torch.manual_seed(0)
    teacher = build_network("resnet_decathlon_tiny", {}, {"a": 3})
    net = build_network(
        "resnet_decathlon_tiny",
        {},
        {"a": 3, "b": 5},
        residual_adapters=True,
        backbone_state=teacher.backbone.state_dict(),
    )
    assert net.domain_specific
    images = {"a": torch.randn(4, 3, 28, 28), "b": torch.randn(4, 3, 28, 28)}
    out = net(images)
    sum(o["pred"].square().mean() for o in out.values()).backward()
    grads = {n: p.grad for n, p in net.backbone.named_parameters()}
    assert all(g is not None for n, g in grads.items() if ".adapters." in n or ".norms." in n)
    net.eval()
    with torch.no_grad():
        together = net(images)["b"]["pred"]
        alone = net.classify(images["b"], "b")
    torch.testing.assert_close(together, alone)
    # at attachment the adapters are zero and BN copies equal: domain a matches the teacher
    fresh = build_network(
        "resnet_decathlon_tiny", {}, {"a": 3}, residual_adapters=True,
        backbone_state=teacher.backbone.state_dict(),
    ).eval()  # fmt: skip
    teacher.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            fresh({"a": images["a"]})["a"]["features"],
            teacher({"a": images["a"]})["a"]["features"],
        )
