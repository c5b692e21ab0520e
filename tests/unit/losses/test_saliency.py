"""SRDML's saliency relations (:mod:`unirep.losses.saliency`) against the reference's per-sample
loop: the batched saliency, the regulariser's gradient w.r.t. the network, the update of the
relation ``c`` and its guards (a zero ``c``, the collapse onto one pair, zero or non-finite
gradients), the network's per-task views, the config rules and a two-process update."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.errors import ConfigError
from unirep.losses.saliency import (
    SaliencyRelations,
    pair_distances,
    project_floored_simplex,
    relation_gradient,
    relation_step,
    saliency,
    task_scores,
)
from unirep.models.dense import DenseMultiTaskNet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread

TASKS = {"semantic": 4, "depth": 1, "normal": 3}
HAS_CLASSES = {"semantic": True, "depth": False, "normal": False}
PAIRS = [("semantic", "depth"), ("semantic", "normal"), ("depth", "normal")]
B, H, W = 3, 8, 12


class TinyEncoder(nn.Module):
    """Two conv stages without batch norm (no coupling between the samples of a batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.channels, self.reductions = [5, 6], [1, 2]
        self.first = nn.Conv2d(3, 5, 3, padding=1)
        self.second = nn.Conv2d(5, 6, 3, stride=2, padding=1)

    def forward(self, images: Tensor) -> list[Tensor]:
        a = torch.tanh(self.first(images))
        return [a, torch.tanh(self.second(a))]


def _net(views: bool = True) -> DenseMultiTaskNet:
    """A tiny dense network in float64 and eval mode (its heads' batch norms per sample)."""
    torch.manual_seed(0)
    net = DenseMultiTaskNet(TinyEncoder(), TASKS, decoder_channels=7, unit_vector=["normal"])
    net.task_views = views
    return net.double().eval()


def _images(seed: int = 1, b: int = B) -> Tensor:
    return torch.randn(b, 3, H, W, generator=torch.Generator().manual_seed(seed)).double()


def _reference_score(task: str, pred: Tensor) -> Tensor:
    """``y_t`` of one sample ``[1, K, H, W]``, written apart from :func:`task_scores`."""
    if HAS_CLASSES[task]:
        one_hot = F.one_hot(pred.argmax(1), pred.shape[1]).permute(0, 3, 1, 2).to(pred.dtype)
        return (pred * one_hot).sum() / (pred.shape[-2] * pred.shape[-1])
    return pred.sum() / (pred.shape[-2] * pred.shape[-1])


def _reference_saliency(net: DenseMultiTaskNet, images: Tensor) -> dict[str, list[Tensor]]:
    """The reference's loop (``BaiTheBest/SRDML`` train.py): the shared feature of the batch,
    then per sample ``e`` and task, the gradient of the task's output w.r.t. the sample's slice
    ``feature_map[e]`` as the task's head reads it (every stage, for a pyramid decoder), summed
    over space, with its graph kept."""
    alpha: dict[str, list[Tensor]] = {t: [] for t in TASKS}
    feature_map = net.encoder(images)
    for e in range(images.shape[0]):
        for task in TASKS:
            fmap = [stage[e].unsqueeze(0) for stage in feature_map]
            pred = net.predict(task, net.decoders[task](fmap), images.shape[-2:])
            grads = torch.autograd.grad(_reference_score(task, pred), fmap, create_graph=True)
            alpha[task].append(torch.cat([g.sum(dim=(2, 3))[0] for g in grads]))
    return alpha


def _reference_regulariser(alpha: dict[str, list[Tensor]], c: Tensor) -> Tensor:
    """``Σ_p (c_p/Σc)·mean_b ‖α_u(b) − α_v(b)‖₁`` as sums over samples and pairs."""
    total = torch.zeros((), dtype=torch.float64)
    for b in range(len(alpha["semantic"])):
        for p, (u, v) in enumerate(PAIRS):
            total = total + c[p] / c.sum() * (alpha[u][b] - alpha[v][b]).abs().sum()
    return total / len(alpha["semantic"])


def _batched(net: DenseMultiTaskNet, images: Tensor) -> dict[str, Tensor]:
    out = net(images)
    preds = {t: out[t]["pred"] for t in TASKS}
    return saliency(task_scores(preds, HAS_CLASSES), {t: out[t]["shared"] for t in TASKS})


def test_the_batched_saliency_equals_the_per_sample_loop() -> None:
    net, images = _net(), _images()
    batched = _batched(net, images)
    reference = _reference_saliency(net, images)
    for task in TASKS:
        assert batched[task].shape == (B, 11)
        torch.testing.assert_close(batched[task].double(), torch.stack(reference[task]))
        assert batched[task].abs().sum() > 0


def test_the_regulariser_and_its_gradient_equal_the_per_sample_reference() -> None:
    """The second-order gradient w.r.t. every parameter (encoder, decoders, heads) matches."""
    net, images = _net(), _images(2)
    c = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    params = [p for p in net.parameters() if p.requires_grad]
    ours = (c * pair_distances(_batched(net, images), PAIRS).double()).sum()
    theirs = _reference_regulariser(_reference_saliency(net, images), c)
    torch.testing.assert_close(ours, theirs)
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    g_theirs = torch.autograd.grad(theirs, params, allow_unused=True)
    reached = 0
    for p, a, b in zip(params, g_ours, g_theirs, strict=True):
        assert (a is None) == (b is None), p.shape
        if a is not None:
            torch.testing.assert_close(a, b)
            reached += int(a.abs().sum() > 0)
    assert reached > len(params) // 2  # the test can fail: most parameters get a gradient


def test_each_task_view_reaches_only_its_own_decoder() -> None:
    net = _net()
    out = net(_images())
    y = task_scores({"depth": out["depth"]["pred"]}, HAS_CLASSES)["depth"].sum()
    views = [v for t in TASKS for v in out[t]["shared"]]
    grads = torch.autograd.grad(y, views, allow_unused=True)
    owners = [t for t in TASKS for _ in out[t]["shared"]]
    assert all((g is not None) == (t == "depth") for g, t in zip(grads, owners, strict=True))


def test_the_default_forward_is_unchanged() -> None:
    images = _images()
    plain, viewed = _net(views=False), _net(views=True)
    a, b = plain(images), viewed(images)
    assert "shared" not in a["semantic"]
    for task in TASKS:
        assert torch.equal(a[task]["pred"], b[task]["pred"])


def _reference_update(c: list[float], d: list[float], mu: float, lr: float) -> list[float]:
    """The reference's analytic gradient, as written in its loop, then a plain step."""
    c_sum = sum(c)
    e = sum(c[p] / c_sum**2 * d[p] for p in range(len(c)))
    return [c[p] - lr * mu * (d[p] / c_sum - e) for p in range(len(c))]


def _reference_projection(x: list[float], floor: float) -> Tensor:
    """``max(x − θ, floor)`` with ``Σ = 1``, ``θ`` found by bisection (the KKT point)."""
    lo, hi = min(x) - 2.0, max(x) + 2.0
    for _ in range(200):
        theta = (lo + hi) / 2
        if sum(max(v - theta, floor) for v in x) > 1:
            lo = theta
        else:
            hi = theta
    return torch.tensor([max(v - theta, floor) for v in x], dtype=torch.float64)


@pytest.mark.parametrize("floor", [0.0, 0.05, 0.2])
def test_the_update_of_c_is_the_reference_step_then_the_projection(floor: float) -> None:
    c = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    d = torch.tensor([0.4, 2.0, 1.1], dtype=torch.float64)
    mu, lr = 0.1, 3.0
    expected = _reference_projection(_reference_update(c.tolist(), d.tolist(), mu, lr), floor)
    got = relation_step(c, d, mu, lr, floor)
    torch.testing.assert_close(got, expected)
    assert got.sum().item() == pytest.approx(1.0) and bool((got >= floor - 1e-12).all())
    assert got[0] > c[0] and got[1] < c[1]  # mass moves to the closer pair


def test_the_gradient_of_c_is_the_autograd_gradient_of_the_normalised_sum() -> None:
    c = torch.tensor([0.7, 1.3, 0.4], dtype=torch.float64, requires_grad=True)
    d = torch.tensor([0.4, 2.0, 1.1], dtype=torch.float64)
    (auto,) = torch.autograd.grad(0.1 * (c / c.sum() * d).sum(), c)
    torch.testing.assert_close(relation_gradient(c.detach(), d, 0.1), auto)


def test_the_term_updates_c_in_training_only_and_logs_it() -> None:
    net, images = _net(), _images()
    term = SaliencyRelations(list(TASKS), HAS_CLASSES, weight=0.1, relation_lr=0.5, floor=0.05)
    start = term.relation.clone()
    values, logs = term(net(images), None, step=0)  # type: ignore[arg-type]
    d = pair_distances(_batched(net, images), PAIRS).detach()
    expected = relation_step(start, d.float(), 0.1, 0.5, 0.05)
    torch.testing.assert_close(term.relation, expected)
    assert not torch.equal(term.relation, start)
    torch.testing.assert_close(values["srdml"].float(), 0.1 * (start * d).sum().float())
    assert logs["relation/semantic-depth"] == term.relation[0]
    assert set(logs) >= {"loss", "distance/depth-normal", "relation/depth-normal"}
    term.eval()
    before = term.relation.clone()
    term(net(images), None, step=1)  # type: ignore[arg-type]
    assert torch.equal(term.relation, before)
    term.train()
    with torch.no_grad():
        values, _ = term(net(images), None, step=2)  # type: ignore[arg-type]
    assert torch.equal(term.relation, before) and values["srdml"].item() == 0.0


def test_the_ramp_up_scales_the_term() -> None:
    net, images = _net(), _images()
    term = SaliencyRelations(list(TASKS), HAS_CLASSES, weight=0.1, rampup_steps=4).eval()
    full, _ = term(net(images), None, step=8)  # type: ignore[arg-type]
    quarter, _ = term(net(images), None, step=1)  # type: ignore[arg-type]
    torch.testing.assert_close(quarter["srdml"], full["srdml"] / 4)


def test_an_all_zero_c_stays_finite_and_returns_to_the_simplex() -> None:
    net, images = _net(), _images()
    term = SaliencyRelations(list(TASKS), HAS_CLASSES, floor=0.0)
    term.relation.zero_()  # where the reference's ReLU can leave it
    values, logs = term(net(images), None, step=0)  # type: ignore[arg-type]
    assert torch.isfinite(values["srdml"]) and all(torch.isfinite(v) for v in logs.values())
    assert term.relation.sum().item() == pytest.approx(1.0)
    zero = torch.zeros(3)
    assert torch.isfinite(relation_gradient(zero, torch.ones(3), 0.1)).all()
    torch.testing.assert_close(project_floored_simplex(zero, 0.0), torch.full((3,), 1 / 3))


@pytest.mark.parametrize("floor", [0.0, 0.05, 1 / 3])
def test_the_floor_bounds_the_collapse_onto_the_closest_pair(floor: float) -> None:
    c, d = torch.full((3,), 1 / 3), torch.tensor([0.1, 2.0, 3.0])
    for _ in range(500):
        c = relation_step(c, d, mu=0.1, lr=1.0, floor=floor)
    assert c.sum().item() == pytest.approx(1.0)
    assert c[0].item() == pytest.approx(1 - 2 * floor, abs=1e-6)  # the bound 1 − (P−1)·floor
    assert c[1:].tolist() == pytest.approx([floor, floor], abs=1e-6)


def test_zero_and_non_finite_gradients_are_guarded() -> None:
    """Outputs that do not depend on the views (a zero saliency): the term is 0, its gradient
    finite (|0|'s subgradient 0); a non-finite distance leaves c where it was."""
    weight = nn.Parameter(torch.randn(B, 4, H, W))
    views = {t: [torch.randn(B, 5, H, W, requires_grad=True)] for t in TASKS}
    preds = {t: weight[:, :k] * (0.0 * views[t][0][:, :1]) for t, k in TASKS.items()}
    outputs = {t: {"pred": preds[t], "shared": views[t]} for t in TASKS}
    term = SaliencyRelations(list(TASKS), HAS_CLASSES)
    values, logs = term(outputs, None, step=0)  # type: ignore[arg-type]
    assert values["srdml"].item() == 0.0 and logs["loss"].item() == 0.0
    (grad,) = torch.autograd.grad(values["srdml"], weight)
    assert bool(torch.isfinite(grad).all())
    unreached = {t: {"pred": weight[:, :k] * 1.0, "shared": views[t]} for t, k in TASKS.items()}
    values, _ = term(unreached, None, step=0)  # type: ignore[arg-type]
    assert values["srdml"].item() == 0.0  # no view reached: zero saliencies, not an error
    c = torch.tensor([0.5, 0.3, 0.2])
    kept = relation_step(c, torch.tensor([float("nan"), 1.0, 1.0]), 0.1, 1.0, 0.05)
    torch.testing.assert_close(kept, c)
    uniform = project_floored_simplex(torch.tensor([float("inf"), 0.0, 0.0]), 0.05)
    torch.testing.assert_close(uniform, torch.full((3,), 1 / 3))


def test_the_record_holds_the_relation_per_pair_and_as_a_matrix() -> None:
    term = SaliencyRelations(list(TASKS), HAS_CLASSES)
    term.relation.copy_(torch.tensor([0.6, 0.3, 0.1]))
    record = term.record()
    assert record["relation"] == pytest.approx(
        {"semantic-depth": 0.6, "semantic-normal": 0.3, "depth-normal": 0.1}
    )
    assert record["matrix"][1][0] == record["matrix"][0][1] == pytest.approx(0.6)
    assert record["closest"] == "semantic-depth" and record["matrix"][2][2] == 0.0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["dense.saliency.floor=0.4"], "'dense.saliency.floor'"),
        (["dense.cross_task={name: mtan}"], "'dense.saliency'"),
        (["dense.sharing={name: smtl}"], "'dense.saliency'"),
        (["dense.saliency.relation_lr=0"], "'dense.saliency.relation_lr'"),
    ],
)
def test_the_config_refuses_what_cannot_work_in_one_line(overrides: list[str], key: str) -> None:
    from unirep.pipeline.validate import load_config

    with pytest.raises(ConfigError) as err:
        load_config("mini-scenes-srdml", overrides)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_the_preset_builds_a_student_with_the_term_and_a_plain_baseline() -> None:
    from unirep.data.streams import build_run_data
    from unirep.objective import build_saliency_terms
    from unirep.pipeline.validate import load_config

    cfg = load_config("mini-scenes-srdml")
    assert cfg.dense is not None and cfg.dense.saliency is not None
    assert cfg.dense.saliency.weight == 0.1
    tasks = build_run_data(cfg).tasks()
    net = _net(views=False)
    terms = build_saliency_terms(cfg.dense.saliency, tasks, net)
    assert set(terms) == {"srdml"} and net.task_views
    assert build_saliency_terms(None, tasks, _net(views=False)) == {}


def _ddp_worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    """One rank: its own half of a batch through the term; saves its relation after the step."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        net, images = _net(), _images(3, b=4)
        term = SaliencyRelations(list(TASKS), HAS_CLASSES, relation_lr=0.5)
        rows = slice(rank * 2, rank * 2 + 2)
        term(net(images[rows]), None, step=0)  # type: ignore[arg-type]
        torch.save(term.relation, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_hold_the_same_relation_from_the_mean_distance(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_ddp_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    net, images = _net(), _images(3, b=4)
    halves = [pair_distances(_batched(net, images[r * 2 : r * 2 + 2]), PAIRS) for r in (0, 1)]
    d = (halves[0] + halves[1]).detach().float() / 2
    expected = relation_step(torch.full((3,), 1 / 3), d, 0.1, 0.5, 0.05)
    relations = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(relations[0], relations[1])
    torch.testing.assert_close(relations[0], expected)
