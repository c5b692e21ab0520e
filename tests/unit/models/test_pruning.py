"""DiSparse on tiny inputs: the per-task normalisation, the unanimous rule at the target
sparsity (against a port of the reference's loop), the importance of a real network against
one forward and backward per task, the dynamic prune-and-regrow (magnitude pruning, per-task
regrowth united over tasks, the cosine prune rate, ERK densities), the packed export layout and
the MACs skipped by zero weights."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unirep.io import pack_sparse, unpack_sparse
from unirep.metrics.cost import inference_cost
from unirep.models.dense import build_dense_encoder
from unirep.models.pruning import (
    DiSparseNet,
    check_disparse_arguments,
    erk_densities,
    mask_iou,
    normalised_keep,
    prune_rate_at,
    unanimous_masks,
    weight_owners,
)
from unirep.pipeline.report import watershed

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = {"semantic": 4, "depth": 1}


def tiny_net(decoder_channels: int = 4, **kwargs) -> DiSparseNet:
    torch.manual_seed(0)
    encoder = partial(build_dense_encoder, "segnet", width_mult=0.125)
    return DiSparseNet(encoder, TASKS, decoder_channels=decoder_channels, **kwargs)


def losses_of(net: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    out = net({"images": images})
    target = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.long)
    return {
        "semantic": F.cross_entropy(out["semantic"]["pred"], target),
        "depth": out["depth"]["pred"].abs().mean(),
    }


def reference_unanimous(scores, owners, keep_ratio):
    """The reference's ``disparse_prune_static`` decision, written as its loops are."""
    keep = {}
    for task, per in scores.items():
        all_scores = torch.cat([torch.flatten(x) for x in per.values()]).double()
        norm = torch.sum(all_scores)
        all_scores = all_scores / norm
        k = int(len(all_scores) * keep_ratio)
        threshold = torch.topk(all_scores, k, sorted=True).values[-1]
        keep[task] = {n: (g.double() / norm) >= threshold for n, g in per.items()}
    final = {}
    for name, owner in owners.items():
        if owner is None:
            pruned = None
            for task in scores:
                m = ~keep[task][name]
                pruned = m if pruned is None else pruned & m
            final[name] = ~pruned
        else:
            final[name] = keep[owner][name]
    return final


def test_the_unanimous_rule_matches_the_reference_and_keeps_each_tasks_share() -> None:
    g = torch.Generator().manual_seed(3)
    owners = {"enc.0": None, "enc.1": None, "a.head": "a", "b.head": "b"}
    shapes = {"enc.0": (8, 3), "enc.1": (16, 8), "a.head": (5, 16), "b.head": (2, 16)}
    scores = {
        t: {
            n: torch.rand(shapes[n], generator=g) * (100.0 if t == "a" else 1.0)
            for n, o in owners.items()
            if o in (None, t)
        }
        for t in ("a", "b")
    }
    for keep_ratio in (0.1, 0.3, 0.7):
        masks, keep = unanimous_masks(scores, owners, keep_ratio)
        expected = reference_unanimous(scores, owners, keep_ratio)
        for name in owners:
            assert torch.equal(masks[name], expected[name]), (keep_ratio, name)
        for task, per in keep.items():  # each task keeps its share of what it reaches
            total = sum(s.numel() for s in scores[task].values())
            assert sum(int(m.sum()) for m in per.values()) == int(total * keep_ratio)
        union = keep["a"]["enc.1"] | keep["b"]["enc.1"]
        assert torch.equal(masks["enc.1"], union) and int(union.sum()) >= max(
            int(keep["a"]["enc.1"].sum()), int(keep["b"]["enc.1"].sum())
        )


def test_each_task_is_normalised_by_its_own_total() -> None:
    g = torch.Generator().manual_seed(0)
    scores = {"w": torch.rand(10, 10, generator=g), "v": torch.rand(7, generator=g)}
    scaled = {n: 1e6 * s for n, s in scores.items()}
    a, b = normalised_keep(scores, 0.2), normalised_keep(scaled, 0.2)
    assert all(torch.equal(a[n], b[n]) for n in scores)
    zeros = normalised_keep({"w": torch.zeros(4)}, 0.5)  # no signal: still a valid mask
    assert zeros["w"].dtype == torch.bool and int(zeros["w"].sum()) >= 2


def test_the_importance_is_each_tasks_own_gradient_on_what_it_reaches() -> None:
    """``|w|·Σ_b|∂L_t/∂w|`` from one forward per batch equals a forward and backward per task
    (the reference's loop) on a copy; batch-norm statistics are left as they were."""
    net = tiny_net(sparsity=0.7)
    images = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    before = {n: b.clone() for n, b in net.named_buffers()}
    sums = net.importance(images, partial(losses_of, net))
    for n, b in net.named_buffers():
        assert torch.equal(b, before[n]), n
    owners = net.owners
    assert set(sums["depth"]) == {n for n, o in owners.items() if o in (None, "depth")}
    assert not any(n.startswith("decoders.semantic") for n in sums["depth"])
    weights = net.weights()
    for task in TASKS:
        expected = {n: torch.zeros_like(weights[n]) for n in sums[task]}
        for x in images:
            net.zero_grad()
            losses_of(net, x)[task].backward()
            for n in expected:
                expected[n] += weights[n].grad.abs()
        for n in expected:
            torch.testing.assert_close(sums[task][n], expected[n], rtol=1e-5, atol=1e-7)
    for n, b in net.named_buffers():  # the reference's loop moved them; put back for the test
        b.copy_(before[n])


def test_a_static_decision_zeros_the_pruned_weights_and_masks_their_gradients() -> None:
    net = tiny_net(sparsity=0.8)
    images = [torch.randn(2, 3, 32, 32)]
    record = net.decide(net.importance(images, partial(losses_of, net)))
    assert record["name"] == "disparse" and record["density"] > record["target_density"] == 0.2
    for name, weight in net.weights().items():
        assert torch.all(weight[~net.mask(name)] == 0), name
    sum(losses_of(net, images[0]).values()).backward()
    for name, weight in net.weights().items():
        assert torch.all(weight.grad[~net.mask(name)] == 0), name
    iou = record["iou"]
    assert len(iou["layers"]) == len(net.shared_layers) and all(0 <= v <= 1 for v in iou["iou"])
    assert all(a <= p + 1e-12 for a, p in zip(iou["iou"], iou["pairwise"], strict=True))


def test_mask_iou_and_the_watershed_layer() -> None:
    owners = {"l0.weight": None, "l1.weight": None, "h.weight": "a"}
    a = {"l0.weight": torch.tensor([1, 1, 0, 0], dtype=torch.bool),
         "l1.weight": torch.tensor([1, 0, 0, 0], dtype=torch.bool)}  # fmt: skip
    b = {"l0.weight": torch.tensor([1, 1, 1, 0], dtype=torch.bool),
         "l1.weight": torch.tensor([0, 1, 0, 0], dtype=torch.bool)}  # fmt: skip
    iou = mask_iou({"a": a, "b": b}, owners)
    assert iou["layers"] == ["l0", "l1"]
    assert iou["iou"] == pytest.approx([2 / 3, 0.0]) and iou["pairwise"] == iou["iou"]
    assert watershed({"pairwise": [1.0, 0.95, 0.9, 0.3, 0.25]}) == 3
    assert watershed({"pairwise": [1.0]}) is None


def test_erk_densities_meet_the_overall_density() -> None:
    shapes = {"a": torch.Size([64, 3, 3, 3]), "b": torch.Size([128, 64, 3, 3]),
              "c": torch.Size([10, 128])}  # fmt: skip
    for density in (0.05, 0.2, 0.5):
        d = erk_densities(shapes, density)
        kept = sum(d[n] * math.prod(s) for n, s in shapes.items())
        assert kept == pytest.approx(density * sum(math.prod(s) for s in shapes.values()))
        assert all(0 < v <= 1 for v in d.values())
        assert d["a"] > d["b"]  # small layers are kept denser
    dense = erk_densities(shapes, 0.9)  # the small first layer saturates and is made dense
    assert dense["a"] == 1.0


def test_the_prune_rate_decays_like_cosine_annealing() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=0.0)
    for step in range(21):
        assert prune_rate_at(step, 20, 0.5) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9)
        opt.step()
        sched.step()


def test_dynamic_prune_and_regrow_unites_the_tasks_regrowth() -> None:
    """Each layer is magnitude-pruned to d·(1 − r); each task regrows d·r of the layer from its
    own gradient among the pruned weights; a shared layer takes the union, a task's own layer
    that task's regrowth."""
    net = tiny_net(32, mode="dynamic", sparsity=0.9, interval=10, end=1.0, prune_rate=0.5)
    net.erk_start()
    densities = net.layer_densities()
    total = 100
    done = 10
    rate = prune_rate_at(done, total, 0.5)
    weights = net.weights()
    shared = max(net.shared_layers, key=lambda n: weights[n].numel())  # sparse under ERK
    own = max((n for n, o in net.owners.items() if o == "depth"), key=lambda n: weights[n].numel())
    assert densities[shared] < 1 and densities[own] < 1
    grads = {t: {n: torch.zeros_like(weights[n]) for n, o in net.owners.items() if o in (None, t)}
             for t in TASKS}  # fmt: skip
    pruned_shared = (~net.mask(shared)).flatten().nonzero().flatten()
    a_pick, b_pick = int(pruned_shared[0]), int(pruned_shared[1])
    grads["semantic"][shared].view(-1)[a_pick] = 5.0
    grads["depth"][shared].view(-1)[b_pick] = 5.0
    magnitude_before = weights[shared].detach().abs().clone()
    active_before = net.mask(shared).clone()
    net.prune_and_regrow(done, total, grads)
    mask = net.mask(shared)
    assert bool(mask.view(-1)[a_pick]) and bool(mask.view(-1)[b_pick])  # both tasks' picks
    n = mask.numel()
    keep_n = round(densities[shared] * (1 - rate) * n)
    grow_n = round(densities[shared] * n) - keep_n
    survived = weights[shared].detach() != 0  # regrown weights start at zero
    assert int(survived.sum()) == keep_n and bool((survived <= active_before).all())
    smallest_kept = magnitude_before[survived].min()
    dropped = active_before & ~survived
    assert bool((magnitude_before[dropped] <= smallest_kept).all())
    assert keep_n + grow_n <= int(mask.sum()) <= keep_n + 2 * grow_n  # union of two tasks
    own_mask = net.mask(own)
    assert int(own_mask.sum()) == round(densities[own] * own_mask.numel())  # one task's regrowth
    for name, weight in net.weights().items():
        assert torch.all(weight[~net.mask(name)] == 0)
    assert net.due(10, total) and not net.due(11, total) and not net.due(100, total)


def test_bad_settings_name_the_argument() -> None:
    with pytest.raises(ValueError, match="mode must be one of static, pretrained, dynamic"):
        check_disparse_arguments(mode="magnitude")
    with pytest.raises(ValueError, match="sparsity"):
        check_disparse_arguments(sparsity=1.0)
    with pytest.raises(ValueError, match="interval"):
        check_disparse_arguments(interval=0)


def test_weight_owners_follow_the_task_modules() -> None:
    owners = weight_owners(tiny_net(), TASKS)
    assert all(o is None for n, o in owners.items() if n.startswith("encoder."))
    assert all(o == n.split(".")[1] for n, o in owners.items() if n.startswith("decoders."))
    assert all(o == n.split(".")[1] for n, o in owners.items() if n.startswith("heads."))


def test_the_packed_layout_restores_every_tensor_and_shrinks_with_sparsity() -> None:
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, 3, 3, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.9] = 0
    state = {"w": w, "bias": torch.randn(64, generator=g), "mask": torch.ones(10, dtype=torch.bool)}
    packed, record = pack_sparse(state)
    assert set(record) == {"w"} and "w" not in packed
    restored = unpack_sparse(packed, record)
    assert set(restored) == set(state)
    assert all(torch.equal(restored[k], state[k]) for k in state)
    assert len(save(packed)) < 0.2 * len(save(state))
    broken = dict(packed)
    broken["w.__values__"] = broken["w.__values__"][:-1]
    with pytest.raises(ValueError, match="'w' has"):
        unpack_sparse(broken, record)


def test_nonzero_macs_skip_the_zero_weights() -> None:
    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.fc = nn.Linear(8, 4, bias=False)

        def forward(self, inputs):
            x = self.conv(inputs["x"])
            return self.fc(x.mean((2, 3)))

    net = One()
    with torch.no_grad():
        net.conv.weight[:4] = 0  # half the convolution's weights
        net.fc.weight[0] = 0
    cost = inference_cost(net, "x", [3, 10, 10], batch=2, repeats=1)
    dense = 10 * 10 * 8 * 3 * 9 + 8 * 4
    assert cost["macs_per_image"] == dense
    assert cost["nonzero_macs_per_image"] == dense - 10 * 10 * 4 * 27 - 8
    assert cost["nonzero_params"] == 8 * 27 + 32 - 4 * 27 - 8
