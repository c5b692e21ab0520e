"""Cross-task consistency terms and InfoNCE against naive loops, and their properties.

Covers :mod:`unirep.losses.transfer` (Nakano, Chen & Demachi 2021, generalised to any task pairs)
and :mod:`unirep.losses.contrastive` (InfoNCE over the global batch; CRD-style feature loss),
including a two-process gloo run that must reproduce the one-process loss and gradients.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

import unirep.losses.contrastive  # noqa: F401  (registers FEATURE_LOSSES["infonce"])
from tests.conftest import random_dense_batch
from unirep.losses.contrastive import InfoNCEFeatureLoss, gather_batch, info_nce
from unirep.losses.distillation import FEATURE_LOSSES
from unirep.losses.transfer import (
    CrossTaskTerms,
    TransferNet,
    alignment_distance,
    consistency_distance,
    transfer_input,
    transfer_output,
)

KINDS = {"seg": "semantic", "depth": "depth", "normal": "normal"}
CHANNELS = {"seg": 4, "depth": 1, "normal": 3}
B, H, W = 4, 12, 20
WIDTHS = (4, 8)
MASK = torch.tensor([True, False, True, False])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread


def _batch(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[dict, dict]:
    """Predictions (leaf tensors with gradients) and targets with about a fifth invalid."""
    preds, targets, _ = random_dense_batch(B, H, W, seed, dtype)
    return {t: p.requires_grad_() for t, p in preds.items()}, targets


def _masks(seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = {t: torch.rand(B, generator=g) > 0.5 for t in KINDS}
    masks["seg"] = MASK.clone()  # at least one labelled and one unlabelled image
    return masks


def _terms(terms: tuple[str, ...], **kwargs) -> CrossTaskTerms:
    torch.manual_seed(0)
    return CrossTaskTerms(KINDS, CHANNELS, terms=terms, widths=WIDTHS, **kwargs).double()


class _Const(nn.Module):
    """Stands in for a transfer network: returns a fixed tensor whatever its input."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        return self.value


# ---------------------------------------------------------------------------------------------
# naive references
# ---------------------------------------------------------------------------------------------


def _naive_consistency(kind: str, x: Tensor, d: Tensor, semantic: str = "kl") -> Tensor:
    """Per-image loop: the distance of each image, then the mean over images."""
    d = d.detach()
    values = []
    for i in range(x.shape[0]):
        xi, di = x[i], d[i]  # [C, H, W]
        if kind != "semantic":
            values.append((xi - di).abs().mean())
        elif semantic == "kl":
            p = di.softmax(0)
            values.append((p * (p.log() - xi.log_softmax(0))).sum(0).mean())
        else:
            values.append(-xi.log_softmax(0).gather(0, di.argmax(0)[None]).mean())
    return torch.stack(values).mean()


def _naive_alignment(kind: str, x: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-image loop over labelled images: summed error over valid pixels / their count."""
    total, count = x.sum() * 0.0, 0
    for i in range(x.shape[0]):
        if not mask[i]:
            continue
        if kind == "semantic":
            valid = target[i] != -1
            logp = x[i].log_softmax(0)[:, valid]  # [K, n]
            labels = target[i][valid]
            total = total - logp[labels, torch.arange(labels.numel())].sum()
        elif kind == "depth":
            valid = target[i, 0] > 0
            total = total + (x[i, 0][valid] - target[i, 0][valid]).abs().sum()
        else:
            valid = target[i].ne(0).any(0)
            total = total + (x[i][:, valid] - target[i][:, valid]).abs().mean(0).sum()
        count += int(valid.sum())
    return total / max(count, 1)


def _naive_info_nce(a: Tensor, c: Tensor, temperature: float, symmetric: bool = False) -> Tensor:
    """Per-anchor ``−log softmax`` of the cosine similarities over temperature."""

    def one_way(anchors: Tensor, candidates: Tensor) -> Tensor:
        losses = []
        for i in range(anchors.shape[0]):
            sims = (
                torch.stack([F.cosine_similarity(anchors[i], cj, dim=0) for cj in candidates])
                / temperature
            )
            losses.append(-(sims[i] - torch.logsumexp(sims, 0)))
        return torch.stack(losses).mean()

    loss = one_way(a, c)
    return 0.5 * (loss + one_way(c, a)) if symmetric else loss


def _naive_terms(module: CrossTaskTerms, preds: dict, targets: dict, masks: dict) -> dict:
    """Every term by per-image calls of the transfer networks and the naive distances."""

    def per_image(a: str, b: str, x: Tensor) -> Tensor:
        net = module.transfers[f"{a}_to_{b}"]
        rows = [
            transfer_output(KINDS[b], net(transfer_input(KINDS[a], x[i : i + 1])))
            for i in range(x.shape[0])
        ]
        return torch.cat(rows)

    out: dict[str, list[Tensor]] = {t: [] for t in module.terms}
    for a, b in module.pairs:
        y = per_image(a, b, preds[a])
        if "consistency" in out:
            out["consistency"].append(_naive_consistency(KINDS[b], y, preds[b]))
        if "alignment" in out:
            out["alignment"].append(_naive_alignment(KINDS[b], y, targets[b], masks[b]))
        if "cycle" in out and (b, a) in module.pairs:
            back = per_image(b, a, y)
            out["cycle"].append(_naive_consistency(KINDS[a], back, preds[a]))
        if "contrastive" in out:
            project = module.projectors[b]
            z_direct = torch.cat(
                [project(transfer_input(KINDS[b], preds[b][i : i + 1])) for i in range(B)]
            )
            z_moved = torch.cat([project(transfer_input(KINDS[b], y[i : i + 1])) for i in range(B)])
            out["contrastive"].append(
                _naive_info_nce(z_moved, z_direct, module.temperature, symmetric=True)
            )
    return {t: torch.stack(v).mean() for t, v in out.items()}


# ---------------------------------------------------------------------------------------------
# transfer network and its input/output
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(48, 64), (32, 48), (30, 45)])
def test_transfer_net_keeps_any_size(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = TransferNet(4, 3, (4, 8, 16))
    assert net(torch.randn(2, 4, *size)).shape == (2, 3, *size)


def test_transfer_net_refuses_too_small_maps_and_has_no_normalisation() -> None:
    net = TransferNet(1, 2, (4, 8, 16))
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in net.modules())
    assert not any(isinstance(m, nn.GroupNorm | nn.LayerNorm) for m in net.modules())
    with pytest.raises(ValueError, match="too small"):
        net(torch.randn(1, 1, 7, 16))
    with pytest.raises(ValueError, match="widths"):
        TransferNet(1, 2, ())


def test_transfer_input_and_output() -> None:
    preds, _ = _batch()
    torch.testing.assert_close(
        transfer_input("semantic", preds["seg"]), preds["seg"].log_softmax(1)
    )
    assert transfer_input("depth", preds["depth"]) is preds["depth"]
    assert transfer_input("normal", preds["normal"]) is preds["normal"]
    raw = torch.randn(B, 3, H, W, dtype=torch.float64)
    norms = transfer_output("normal", raw).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    depth = raw[:, :1]
    assert transfer_output("depth", depth) is depth
    assert transfer_output("semantic", raw) is raw
    with pytest.raises(KeyError, match="unknown task kind"):
        transfer_input("edges", raw)


# ---------------------------------------------------------------------------------------------
# distances
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "semantic"), [("seg", "kl"), ("seg", "ce"), ("depth", "kl"), ("normal", "kl")]
)
def test_consistency_distance_matches_loop(task: str, semantic: str) -> None:
    preds, _ = _batch(0)
    other, _ = _batch(5)
    kind = KINDS[task]
    x = transfer_output(kind, other[task].detach() * 1.3).requires_grad_()
    value = consistency_distance(kind, x, preds[task], semantic)
    torch.testing.assert_close(value, _naive_consistency(kind, x, preds[task], semantic))
    value.backward()
    assert preds[task].grad is None  # the direct prediction is detached
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_consistency_distance_refuses_bad_arguments() -> None:
    preds, _ = _batch()
    with pytest.raises(ValueError, match="semantic distance 'l2'"):
        consistency_distance("semantic", preds["seg"], preds["seg"], "l2")
    with pytest.raises(ValueError, match="same shape"):
        consistency_distance("depth", preds["depth"], preds["depth"][:2])


@pytest.mark.parametrize("task", list(KINDS))
def test_alignment_distance_matches_loop_and_masks_gradients(task: str) -> None:
    other, targets = _batch(3)
    kind = KINDS[task]
    x = other[task].detach().clone().requires_grad_()
    value = alignment_distance(kind, x, targets[task], MASK)
    torch.testing.assert_close(value, _naive_alignment(kind, x, targets[task], MASK))
    value.backward()
    assert torch.equal(x.grad[~MASK], torch.zeros_like(x.grad[~MASK]))
    assert x.grad[MASK].abs().sum() > 0


@pytest.mark.parametrize("task", list(KINDS))
def test_alignment_ignores_non_finite_unlabelled_images(task: str) -> None:
    other, targets = _batch(3)
    x = other[task].detach().clone()
    x[~MASK] = float("nan")
    x.requires_grad_()
    value = alignment_distance(KINDS[task], x, targets[task], MASK)
    value.backward()
    assert torch.isfinite(value)
    assert torch.equal(x.grad[~MASK], torch.zeros_like(x.grad[~MASK]))


@pytest.mark.parametrize("task", list(KINDS))
def test_alignment_without_labels_is_an_exact_zero_in_the_graph(task: str) -> None:
    other, targets = _batch(3)
    x = other[task].detach().clone().requires_grad_()
    value = alignment_distance(KINDS[task], x, targets[task], torch.zeros(B, dtype=torch.bool))
    assert value.item() == 0.0 and not torch.isnan(value)
    assert value.requires_grad
    value.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_alignment_accepts_a_three_dim_depth_target_and_refuses_bad_shapes() -> None:
    other, targets = _batch(3)
    x = other["depth"].detach()
    torch.testing.assert_close(
        alignment_distance("depth", x, targets["depth"][:, 0], MASK),
        alignment_distance("depth", x, targets["depth"], MASK),
    )
    with pytest.raises(ValueError, match="does not match"):
        alignment_distance("normal", other["normal"], targets["depth"], MASK)
    with pytest.raises(ValueError, match="mask"):
        alignment_distance("depth", x, targets["depth"], MASK[:2])


# ---------------------------------------------------------------------------------------------
# CrossTaskTerms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pairs": [("seg", "edges")]}, r"unknown tasks \['edges'\]"),
        ({"pairs": [("seg", "seg")]}, "maps a task to itself"),
        ({"pairs": [("seg", "depth"), ("seg", "depth")]}, "listed twice"),
        ({"pairs": []}, "pairs is empty"),
        ({"terms": ("consistency", "bogus")}, r"unknown terms \['bogus'\]; valid"),
        ({"terms": ()}, "at most once"),
        ({"class_distance": "l2"}, "unknown class_distance 'l2'; valid"),
        ({"temperature": 0.0}, "temperature must be positive, got 0.0"),
        ({"temperature": -1.0}, "temperature must be positive"),
        ({"terms": ("cycle",), "pairs": [("seg", "depth")]}, "reverse"),
    ],
)
def test_cross_task_terms_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CrossTaskTerms(KINDS, CHANNELS, widths=WIDTHS, **kwargs)


def test_cross_task_terms_builds_every_ordered_pair() -> None:
    module = _terms(("consistency",))
    assert sorted(module.transfers) == sorted(f"{a}_to_{b}" for a in KINDS for b in KINDS if a != b)
    assert len(module.transfers) == 6 and module.projectors is None
    net = module.transfers["seg_to_normal"]
    assert (net.in_channels, net.out_channels) == (4, 3)
    with_projectors = _terms(("contrastive",), pairs=[("seg", "depth"), ("normal", "depth")])
    assert list(with_projectors.projectors) == ["depth"]


@pytest.mark.parametrize(
    "terms", [("consistency",), ("alignment", "consistency"), ("cycle", "contrastive")]
)
def test_forward_returns_exactly_the_enabled_terms(terms: tuple[str, ...]) -> None:
    preds, targets = _batch()
    out = _terms(terms)(preds, targets, _masks())
    assert tuple(out) == terms
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())


def test_every_term_matches_the_per_image_reference() -> None:
    preds, targets = _batch()
    masks = _masks()
    module = _terms(("consistency", "alignment", "cycle", "contrastive"), temperature=0.3)
    out = module(preds, targets, masks)
    expected = _naive_terms(module, preds, targets, masks)
    for term in module.terms:
        torch.testing.assert_close(out[term], expected[term], msg=term)


def test_semantic_cross_entropy_distance_is_used() -> None:
    preds, targets = _batch()
    pairs = [("depth", "seg")]
    module = _terms(("consistency",), pairs=pairs, class_distance="ce")
    moved = module.transfer("depth", "seg", preds["depth"])
    expected = F.cross_entropy(moved, preds["seg"].argmax(1))
    torch.testing.assert_close(module(preds, targets, {})["consistency"], expected)


@pytest.mark.parametrize("term", ["consistency", "alignment", "cycle", "contrastive"])
def test_each_term_trains_the_transfer_nets_and_the_student(term: str) -> None:
    preds, targets = _batch()
    module = _terms((term,))
    module(preds, targets, _masks())[term].backward()
    for key, net in module.transfers.items():
        assert net.head.weight.grad is not None and net.head.weight.grad.abs().sum() > 0, key
    for task, pred in preds.items():
        assert pred.grad is not None and pred.grad.abs().sum() > 0, task
    if term == "contrastive":
        for task, projector in module.projectors.items():
            assert projector[-1].weight.grad.abs().sum() > 0, task


def test_direct_prediction_gets_no_gradient_from_consistency() -> None:
    preds, targets = _batch()
    module = _terms(("consistency",), pairs=[("depth", "seg")])
    module(preds, targets, {})["consistency"].backward()
    assert preds["seg"].grad is None
    assert preds["depth"].grad.abs().sum() > 0


def test_cycle_target_is_detached() -> None:
    # With T_{depth→normal} constant, the cycle reaches neither prediction unless a target does.
    preds, targets = _batch()
    module = _terms(("cycle",), pairs=[("depth", "normal"), ("normal", "depth")])
    module.transfers["depth_to_normal"] = _Const(torch.randn(B, 3, H, W, dtype=torch.float64))
    value = module(preds, targets, {})["cycle"]
    assert value > 0
    value.backward()
    assert preds["depth"].grad is None and preds["normal"].grad is None
    assert module.transfers["normal_to_depth"].head.weight.grad.abs().sum() > 0


def test_consistency_is_zero_when_transfers_reproduce_the_direct_predictions() -> None:
    preds, targets = _batch()
    module = _terms(("consistency",))
    for a, b in module.pairs:
        module.transfers[f"{a}_to_{b}"] = _Const(preds[b].detach().clone())
    value = module(preds, targets, {})["consistency"]
    assert 0.0 <= value.item() < 1e-12  # KL, L1 exactly 0; normals up to re-normalisation


@pytest.mark.parametrize("kind", ["depth", "normal"])
def test_cycle_is_zero_for_identity_transfers(kind: str) -> None:
    preds, _ = _batch()
    kinds, channels = {"x": kind, "y": kind}, {"x": CHANNELS[kind], "y": CHANNELS[kind]}
    module = CrossTaskTerms(kinds, channels, terms=("cycle",), widths=WIDTHS).double()
    for key in list(module.transfers):
        module.transfers[key] = nn.Identity()
    value = module({"x": preds[kind], "y": preds[kind].flip(0)}, {}, {})["cycle"]
    assert 0.0 <= value.item() < 1e-12


@pytest.mark.parametrize("term", ["consistency", "cycle"])
def test_terms_are_batch_independent(term: str) -> None:
    preds, targets = _batch()
    module = _terms((term,))
    whole = module(preds, targets, {})[term]
    singles = [
        module({t: p[i : i + 1] for t, p in preds.items()}, targets, {})[term] for i in range(B)
    ]
    torch.testing.assert_close(whole, torch.stack(singles).mean())


def test_forward_refuses_missing_or_mismatched_inputs() -> None:
    preds, targets = _batch()
    module = _terms(("alignment",))
    with pytest.raises(ValueError, match=r"preds lack the tasks \['normal'\]"):
        module({t: preds[t] for t in ("seg", "depth")}, targets, _masks())
    with pytest.raises(ValueError, match="needs masks"):
        module(preds, targets, {})
    with pytest.raises(ValueError, match="same B and H × W"):
        module({**preds, "depth": preds["depth"][:, :, :8]}, targets, _masks())


# ---------------------------------------------------------------------------------------------
# InfoNCE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.07, 0.5])
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_matches_loop(temperature: float, symmetric: bool) -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    c = torch.randn(6, 5, generator=g, dtype=torch.float64)
    value = info_nce(a, c, temperature, symmetric)
    torch.testing.assert_close(value, _naive_info_nce(a, c, temperature, symmetric))


def test_info_nce_temperature_and_minimum() -> None:
    g = torch.Generator().manual_seed(5)
    a, c = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    assert not math.isclose(info_nce(a, c, 0.1).item(), info_nce(a, c, 1.0).item())
    separated = 3.0 * torch.eye(8)
    # log(1 + 7 e^{−10}) ≈ 3e-4, against about log 8 ≈ 2.08 for unrelated rows.
    assert info_nce(separated, separated.clone(), 0.1).item() < 1e-3
    assert info_nce(separated, separated.clone(), 0.1, symmetric=True).item() < 1e-3
    assert info_nce(a, c, 0.1).item() > 1.0


def test_info_nce_single_process_and_refusals() -> None:
    x = torch.randn(3, 4)
    assert gather_batch(x) is x
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(2, 4\)"):
        info_nce(x, x[:2])
    with pytest.raises(ValueError, match="temperature"):
        info_nce(x, x, 0.0)


def _ddp_problem() -> tuple[Tensor, Tensor, nn.Linear]:
    """A fixed global batch of 8 anchor and candidate inputs and a shared linear map."""
    g = torch.Generator().manual_seed(11)
    anchors = torch.randn(8, 5, generator=g, dtype=torch.float64)
    candidates = anchors + 0.7 * torch.randn(8, 5, generator=g, dtype=torch.float64)
    torch.manual_seed(12)
    return anchors, candidates, nn.Linear(5, 4).double()


def _ddp_run(linear: nn.Linear, a: Tensor, c: Tensor, symmetric: bool) -> dict[str, object]:
    linear.zero_grad()
    a, c = a.clone().requires_grad_(), c.clone().requires_grad_()
    loss = info_nce(linear(a), linear(c), 0.2, symmetric)
    loss.backward()
    return {
        "loss": loss.detach(),
        "params": [p.grad.clone() for p in linear.parameters()],
        "a": a.grad,
        "c": c.grad,
    }


def _ddp_worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    """One rank: its half of the global batch; saves its loss and gradients as DDP sees them."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        anchors, candidates, linear = _ddp_problem()
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        results: dict[str, object] = {"gathered": gather_batch(anchors[rows].clone())}
        for symmetric in (False, True):
            run = _ddp_run(linear, anchors[rows], candidates[rows], symmetric)
            for grad in run["params"]:  # DDP's mean over processes
                dist.all_reduce(grad)
                grad /= world
            results[f"symmetric={symmetric}"] = run
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_info_nce_two_processes_equal_one_process(tmp_path: Path) -> None:
    world = 2
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_ddp_worker, args=(world, init, str(tmp_path)), nprocs=world, join=True)
    anchors, candidates, linear = _ddp_problem()
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        torch.testing.assert_close(results["gathered"], anchors, atol=0, rtol=0)
        for symmetric in (False, True):
            got = results[f"symmetric={symmetric}"]
            ref = _ddp_run(linear, anchors, candidates, symmetric)
            torch.testing.assert_close(got["loss"], ref["loss"], atol=1e-6, rtol=0)
            for g_got, g_ref in zip(got["params"], ref["params"], strict=True):
                torch.testing.assert_close(g_got, g_ref, atol=1e-6, rtol=0)
            # Local inputs are not averaged by DDP: they carry world × their one-process slice,
            # which DDP's mean turns back into the one-process gradient of the parameters.
            for side in ("a", "c"):
                torch.testing.assert_close(got[side], world * ref[side][rows], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# InfoNCEFeatureLoss
# ---------------------------------------------------------------------------------------------


def test_infonce_feature_loss_is_registered_and_honours_temperature() -> None:
    loss = FEATURE_LOSSES.build("infonce", temperature=0.2)
    assert isinstance(loss, InfoNCEFeatureLoss) and loss.temperature == 0.2
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    torch.testing.assert_close(loss(s, t), info_nce(s, t, 0.2))
    with pytest.raises(ValueError, match="temperature"):
        InfoNCEFeatureLoss(temperature=-0.1)


def test_infonce_feature_loss_pools_maps_and_detaches_the_teacher() -> None:
    g = torch.Generator().manual_seed(7)
    s = torch.randn(4, 6, 3, 5, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(4, 6, 3, 5, generator=g, dtype=torch.float64).requires_grad_()
    loss_fn = InfoNCEFeatureLoss(temperature=0.1)
    value = loss_fn(s, t)
    torch.testing.assert_close(value, loss_fn(s.mean((2, 3)), t.mean((2, 3))))
    value.backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_infonce_feature_loss_refuses_mismatched_shapes() -> None:
    loss_fn = InfoNCEFeatureLoss()
    with pytest.raises(ValueError, match=r"\(4, 8\) and teacher \(4, 6\) features must have"):
        loss_fn(torch.randn(4, 8), torch.randn(4, 6))
    with pytest.raises(ValueError, match="same batch size, got 4 and 3"):
        loss_fn(torch.randn(4, 8, 2, 2), torch.randn(3, 8, 2, 2))
