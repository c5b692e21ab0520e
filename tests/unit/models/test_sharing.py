"""SMTL (unirep.models.sharing): the gates' forward, the Lite draws and the Lite export."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from unirep.errors import ConfigError
from unirep.models.build import build_dense, count_parameters, exported
from unirep.models.dense import build_dense_encoder
from unirep.models.sharing import SMTLNet
from unirep.pipeline.validate import load_config

TASKS = {"semantic": 4, "depth": 1, "normal": 3}
ARCH = {"encoder": "segnet", "encoder_kwargs": {"width_mult": 0.0625}, "decoder_channels": 6}


def _net(init: int = 0, **kwargs: Any) -> SMTLNet:
    torch.manual_seed(init)
    arch = {**ARCH, "sharing": "smtl", "sharing_kwargs": kwargs}
    net = build_dense(arch, TASKS, ["normal"])
    assert isinstance(net, SMTLNet)
    return net


def _images(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _by_hand(net: SMTLNet, x: torch.Tensor, task: str, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 1 of the paper, written out: mix the two encoders stage by stage, decode, head."""
    public, private = net.encoder(x), net.private[task](x)
    stages = [weights[0] * p + weights[1] * q for p, q in zip(public, private, strict=True)]
    pred = net.heads[task](net.decoders[task](stages))
    pred = F.interpolate(pred, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return F.normalize(pred, dim=1) if task == "normal" else pred


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_soft_gates_mix_the_public_and_private_encoders(gate: str) -> None:
    net = _net(gate=gate).eval()
    with torch.no_grad():
        net.gates.logits.copy_(torch.tensor([[0.3, -1.0], [2.0, 0.5], [-0.2, 0.1]]))
        weights = net.gate_weights()
        expected = (
            torch.softmax(net.gates.logits, 1)
            if gate == "softmax"
            else torch.sigmoid(net.gates.logits)
        )
        assert torch.equal(weights, expected)
        if gate == "sigmoid":
            assert not torch.allclose(weights.sum(1), torch.ones(3))  # each α on its own
        x = _images()
        out = net(x)
        for i, task in enumerate(net.tasks):
            assert torch.allclose(out[task]["pred"], _by_hand(net, x, task, weights[i]), atol=1e-6)
    assert count_parameters(net.private) == 3 * count_parameters(net.encoder)


def test_gates_start_even_and_every_part_gets_a_gradient() -> None:
    net = _net(gate="softmax")
    assert torch.equal(net.gate_weights(), torch.full((3, 2), 0.5))
    out = net(_images())
    sum(o["pred"].mean() for o in out.values()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert net.shared_parameters() == [p for p in net.encoder.parameters()]


def test_gates_after_decoders_mix_the_two_paths_outputs() -> None:
    net = _net(gate="softmax", after_decoders=True).eval()
    with torch.no_grad():
        net.gates.logits.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 2.0]]))
        w = net.gate_weights()
        x = _images()
        out = net(x)
        public, private = net.encoder(x), net.private["depth"](x)
        by_hand = w[1, 0] * net.heads["depth"](net.decoders["depth"](public)) + w[
            1, 1
        ] * net.private_heads["depth"](net.private_decoders["depth"](private))
        by_hand = F.interpolate(by_hand, size=(32, 32), mode="bilinear", align_corners=False)
        assert torch.allclose(out["depth"]["pred"], by_hand, atol=1e-6)


def test_distill_from_private_hands_the_private_encoder_to_the_adapters() -> None:
    net = _net(distill_from="private").eval()
    x = _images()
    with torch.no_grad():
        out = net(x)
        assert torch.equal(out["depth"]["bottleneck"], net.private["depth"](x)[-1])
        mixed = _net(distill_from="mixed").eval()(x)["depth"]["bottleneck"]
        both = 0.5 * net.encoder(x)[-1] + 0.5 * net.private["depth"](x)[-1]
        assert torch.allclose(mixed, both, atol=1e-6)
    aligners = net.build_aligners({"depth": 5})
    assert [tuple(a.shape[:2]) for a in aligners["depth"](out["depth"])] == [(2, 5), (2, 5)]


def test_lite_draws_are_hard_seeded_counted_and_carry_a_gradient() -> None:
    a, b, c = _net(gate="lite", seed=7), _net(gate="lite", seed=7), _net(gate="lite", seed=8)
    draws_a = [a.gate_weights() for _ in range(20)]
    draws_b = [b.gate_weights() for _ in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(draws_a, draws_b, strict=True))
    assert int(a.gates.draws) == 20 and "gates.draws" in a.state_dict()
    picks = torch.stack([d.detach() for d in draws_a])
    assert torch.equal(picks.sum(-1), torch.ones(20, 3))  # one encoder per task and draw
    assert 0 < picks[:, :, 1].mean() < 1  # σ(0) = 0.5: both encoders get drawn
    draws_c = [c.gate_weights() for _ in range(20)]
    assert not all(torch.equal(x, y) for x, y in zip(draws_a, draws_c, strict=True))
    # a resumed network (the counter restored) draws what the uninterrupted one draws next
    resumed = _net(gate="lite", seed=7)
    resumed.load_state_dict(a.state_dict())
    assert torch.equal(resumed.gate_weights(), b.gate_weights())
    # straight-through: the hard draw passes the soft draw's gradient to the gate's logit
    a.gate_weights()[:, 1].sum().backward()
    assert a.gates.logits.grad is not None and a.gates.logits.grad.abs().sum() > 0


@pytest.mark.parametrize("after_decoders", [False, True])
@pytest.mark.parametrize(
    "logits", [[-1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [0.0, -0.5, 3.0]]
)
def test_lite_export_keeps_what_the_tasks_picked_and_predicts_the_same(
    logits: list[float], after_decoders: bool
) -> None:
    net = _net(gate="lite", after_decoders=after_decoders)
    with torch.no_grad():
        net.gates.logits[:, 0] = torch.tensor(logits)
    net.eval()
    arch = {**ARCH, "sharing": "smtl", "sharing_kwargs": {"gate": "lite"}}
    record, fixed = exported(net, arch)
    assert record["sharing_kwargs"]["after_decoders"] is after_decoders
    picked = {t: "private" if v >= 0 else "public" for t, v in zip(net.tasks, logits, strict=True)}
    assert record["sharing_kwargs"]["selected"] == picked == net.chosen()
    assert set(fixed.private) == {t for t, p in picked.items() if p == "private"}
    assert (fixed.encoder is None) == all(p == "private" for p in picked.values())
    assert not any("gate" in k for k in fixed.state_dict())
    one = count_parameters(build_dense_encoder("segnet", width_mult=0.0625))
    dropped = (1 if fixed.encoder is None else 0) + sum(p == "public" for p in picked.values())
    assert count_parameters(net) - count_parameters(fixed) >= dropped * one
    x = _images()
    with torch.no_grad():
        ours, theirs = net(x), fixed(x)
    for task in TASKS:
        assert torch.equal(ours[task]["pred"], theirs[task]["pred"])
    # the record rebuilds the exported network (what load_student does)
    again = build_dense(record, TASKS, ["normal"])
    again.load_state_dict(fixed.state_dict(), strict=True)
    assert count_parameters(again) == count_parameters(fixed)


def test_soft_gates_export_as_they_are() -> None:
    net = _net(gate="softmax")
    record, same = exported(net, {"sharing_kwargs": {"gate": "softmax"}})
    assert same is net and "selected" not in record["sharing_kwargs"]
    with pytest.raises(ValueError, match="only the lite gate"):
        net.chosen()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dense.sharing={name: smtl, kwargs: {gate: hard}}", "gate must be one of"),
        ("dense.sharing={name: smtl, kwargs: {tau: 0}}", "tau"),
        ("dense.sharing={name: smtl, kwargs: {distill_from: public}}", "distill_from"),
        ("dense.sharing={name: smtl, kwargs: {width: 2}}", "dense.sharing.kwargs"),
        ("dense.sharing={name: gates}", "valid choices: automtl, disparse, pdf, smtl"),
        ("dense.sharing={name: disparse, kwargs: {mode: magnitude}}", "mode must be one of"),
        ("dense.cross_task={name: mtan}", "cannot be combined"),
    ],
)
def test_sharing_settings_fail_at_start_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config("mini-scenes-smtl", [override])
    assert "dense.sharing" in str(err.value)


def test_the_preset_builds_an_smtl_student_and_teachers_stay_plain() -> None:
    from unirep.models.build import architecture

    cfg = load_config("mini-scenes-smtl", ["seed=5"])
    student = architecture(cfg, student=True)
    assert student["sharing"] == "smtl" and student["sharing_kwargs"]["seed"] == 5
    assert "sharing" not in architecture(cfg)  # one teacher per task: nothing to share
    encoder = partial(build_dense_encoder, "segnet", width_mult=0.0625)
    with pytest.raises(ValueError, match="selected names tasks"):
        SMTLNet(encoder, TASKS, gate="lite", selected={"semantic": "public"})


# --------------------------------------------------------------------------------------------
# Multi-domain classification

DOMAINS = {"digits": 10, "objects": 6, "textures": 5}


def _multi(init: int = 0, **kwargs: Any) -> Any:
    from unirep.models.build import build_network
    from unirep.tasks import TASK_KINDS, Task

    torch.manual_seed(init)
    tasks = {d: Task(d, TASK_KINDS.build("classification"), d, k) for d, k in DOMAINS.items()}
    arch = {"backbone": "resnet_decathlon_tiny", "backbone_kwargs": {}, "sharing": "smtl",
            "sharing_kwargs": kwargs}  # fmt: skip
    return build_network(arch, tasks), arch


def test_multi_domain_smtl_mixes_the_public_and_private_backbones() -> None:
    net, _ = _multi(gate="softmax")
    net.eval()
    with torch.no_grad():
        net.gates.logits.copy_(torch.tensor([[0.5, -0.5], [0.0, 1.0], [2.0, 0.0]]))
        w = net.gates()
        x = {d: torch.randn(2, 3, 28, 28) for d in DOMAINS}
        out = net(x)
        for i, d in enumerate(net.gates.names):
            by_hand = w[i, 0] * net.backbone(x[d]) + w[i, 1] * net.private[d](x[d])
            assert torch.allclose(out[d]["features"], by_hand, atol=1e-5)
            assert torch.allclose(out[d]["pred"], net.heads[d](by_hand), atol=1e-5)
    private = net.build_aligners(dict.fromkeys(DOMAINS, 7))  # distill_from mixed
    assert private["digits"].key == "features"
    other, _ = _multi(gate="softmax", distill_from="private")
    assert other.build_aligners({"digits": 7})["digits"].key == "private"


def test_multi_domain_lite_export_drops_unpicked_backbones_and_predicts_the_same() -> None:
    net, arch = _multi(gate="lite")
    with torch.no_grad():
        net.gates.logits[:, 0] = torch.tensor([1.0, -1.0, 1.0])
    net.eval()
    record, fixed = exported(net, arch)
    assert record["sharing_kwargs"]["selected"] == {
        "digits": "private", "objects": "public", "textures": "private"
    }  # fmt: skip
    assert set(fixed.private) == {"digits", "textures"} and fixed.backbone is not None
    assert count_parameters(fixed) < count_parameters(net)
    x = {d: torch.randn(3, 3, 28, 28) for d in DOMAINS}
    with torch.no_grad():
        a, b = net(x), fixed(x)
    for d in DOMAINS:
        assert torch.equal(a[d]["pred"], b[d]["pred"])


def test_multi_domain_sharing_settings_fail_at_start() -> None:
    with pytest.raises(ConfigError, match="cannot be combined"):
        load_config("mini-decathlon", ["classification.sharing={name: smtl}",
                                       "classification.residual_adapters=true"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"classification\.sharing\.kwargs"):
        load_config("mini-decathlon", ["classification.sharing={name: smtl, kwargs: {gate: x}}"])


def test_a_lite_export_without_a_public_encoder_has_no_timm_backbone() -> None:
    """Every task picked its private encoder: the export has no shared encoder to hand timm (a
    run once failed here), and says why."""
    from unirep.pipeline.export import timm_backbone

    net = _net(gate="lite")
    net.eval()  # σ(0) = 0.5: every task picks its private encoder
    arch = {**ARCH, "sharing": "smtl", "sharing_kwargs": {"gate": "lite"}}
    record, fixed = exported(net, arch)
    assert fixed.encoder is None
    assert "every task picked its private one" in timm_backbone(fixed, record)
    record, fixed = exported(_net(gate="softmax"), {**arch, "sharing_kwargs": {}})
    found = timm_backbone(fixed, record)
    assert not isinstance(found, str) and found[0] == "segnet_mtan"  # the public encoder
