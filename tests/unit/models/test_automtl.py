"""AutoMTL-style learned sharing (unirep.models.automtl): the supernet, its draws and sharing
cost, and the fixed network its choices make."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import nn

from unirep.models.automtl import CHOICES, AutoMTLNet, BranchedConv, TaskBatchNorm
from unirep.models.build import build_dense, count_parameters
from unirep.models.dense import build_dense_encoder

TASKS = {"semantic": 4, "depth": 1, "normal": 3}
SEGNET = {"encoder": "segnet", "encoder_kwargs": {"width_mult": 0.0625}, "decoder_channels": 6}
TIMM = {
    "encoder": "timm",
    "encoder_kwargs": {"model_name": "mobilenetv3_small_050"},
    "decoder_channels": 6,
}


def _net(arch: dict[str, Any] = SEGNET, init: int = 0, **kwargs: Any) -> AutoMTLNet:
    torch.manual_seed(init)
    net = build_dense({**arch, "sharing": "automtl", "sharing_kwargs": kwargs}, TASKS, ["normal"])
    assert isinstance(net, AutoMTLNet)
    return net


def test_every_convolution_becomes_a_choice_and_every_batch_norm_per_task() -> None:
    net = _net()
    plain = build_dense_encoder("segnet", width_mult=0.0625)
    convs = [n for n, m in plain.named_modules() if isinstance(m, nn.Conv2d)]
    assert net.layer_names == convs and len(convs) == 13
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, TaskBatchNorm) for m in net.encoder.modules()) == norms
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.encoder.modules()) == 3 * norms
    # SegNet: the first conv of each stage changes the width (no skip), but the last stage's
    skippable = [layer.skippable for layer in net._layers]
    assert skippable == [False, True, False, True, False, True, True, False, True, True,
                         True, True, True]  # fmt: skip
    assert net.policy.shape == (13, 3, 3)
    p = net.probabilities()
    assert torch.allclose(p.sum(-1), torch.ones(13, 3))
    assert torch.equal(p[0, :, 2], torch.zeros(3))  # no skip where the shape changes


@pytest.mark.parametrize("arch", [SEGNET, TIMM], ids=["segnet", "timm"])
def test_the_supernet_at_its_one_hot_equals_the_fixed_network(arch: dict[str, Any]) -> None:
    """Evaluation runs the argmax one-hot of the policy: the fixed network of those choices,
    holding only the operators some task uses, computes the same predictions."""
    net = _net(arch)
    rng = random.Random(0)
    with torch.no_grad():
        for i, layer in enumerate(net._layers):
            for j in range(len(TASKS)):
                options = [0, 1, 2] if layer.skippable else [0, 1]
                net.policy[i, j, rng.choice(options)] = 1.0
    net.eval()
    choices = net.fixed_choices()
    fixed = build_dense(
        {**arch, "sharing": "automtl", "sharing_kwargs": {"choices": choices}}, TASKS, ["normal"]
    ).eval()
    state = net.state_dict()
    fixed.load_state_dict({k: state[k] for k in fixed.state_dict()}, strict=True)
    assert count_parameters(fixed) < count_parameters(net)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = net(x), fixed(x)
    for task in TASKS:
        assert torch.equal(a[task]["pred"], b[task]["pred"]), task
    for name, layer in zip(fixed.layer_names, fixed._layers, strict=True):
        used = set(choices[name].values())
        assert (layer.shared is not None) == ("shared" in used)
        assert set(layer.specific) == {t for t, c in choices[name].items() if c == "specific"}


def test_shared_everywhere_is_one_encoder_and_specific_everywhere_is_one_per_task() -> None:
    supernet = _net()
    names = supernet.layer_names

    def fixed(choice: str) -> AutoMTLNet:
        choices = {n: dict.fromkeys(TASKS, choice) for n in names}
        return _net(choices=choices)

    encoder = build_dense_encoder("segnet", width_mult=0.0625)
    conv = sum(p.numel() for m in encoder.modules() if isinstance(m, nn.Conv2d)
               for p in m.parameters())  # fmt: skip
    extra = count_parameters(fixed("specific")) - count_parameters(fixed("shared"))
    assert extra == (len(TASKS) - 1) * conv


def test_draws_are_soft_seeded_counted_and_the_cost_reaches_only_specific_logits() -> None:
    a, b = _net(seed=4), _net(seed=4)
    wa, wb = a.policy_weights(), b.policy_weights()
    assert torch.equal(wa, wb) and int(a.policy_draws) == 1
    assert torch.allclose(wa.sum(-1), torch.ones_like(wa[..., 0]))
    assert ((wa > 0) & (wa < 1))[:, :, :2].all()  # relaxed, not one-hot
    assert not torch.equal(a.policy_weights(), wa)  # a new draw each step
    cost = a.regularizer()
    # at the start P(specific) is 1/3 where a skip is possible, else 1/2
    start = sum(
        share * (1 / 3 if layer.skippable else 1 / 2)
        for share, layer in zip(a.layer_share.tolist(), a._layers, strict=True)
    )
    assert cost is not None and cost.item() == pytest.approx(0.05 * len(TASKS) * start, rel=1e-5)
    cost.backward()
    grad = a.policy.grad
    assert grad is not None and (grad[:, :, 1] > 0).all()  # more specific, more cost
    assert _net(penalty=0.0).regularizer() is None
    assert _net(choices=a.fixed_choices()).regularizer() is None
    assert [g for g, _ in a.own_lr_groups()] == [[a.policy]]


def test_training_reaches_the_policy_and_every_branch() -> None:
    net = _net()
    out = net(torch.randn(2, 3, 32, 32))
    (sum(o["pred"].mean() for o in out.values()) + net.regularizer()).backward()
    assert net.policy.grad is not None and net.policy.grad.abs().sum() > 0
    for layer in net._layers:
        assert isinstance(layer, BranchedConv)
        assert layer.shared.weight.grad is not None
        assert all(c.weight.grad is not None for c in layer.specific.values())


def test_choices_that_do_not_fit_the_encoder_are_refused() -> None:
    names = _net().layer_names
    with pytest.raises(ValueError, match="every convolution"):
        _net(choices={names[0]: dict.fromkeys(TASKS, "shared")})
    bad = {n: dict.fromkeys(TASKS, "shared") for n in names}
    bad[names[0]]["depth"] = "copy"
    with pytest.raises(ValueError, match=", ".join(CHOICES)):
        _net(choices=bad)
