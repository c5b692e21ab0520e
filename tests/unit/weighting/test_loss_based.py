"""Loss weightings (issue 12 item 1) on tiny problems, on CPU: ``uncertainty``, ``static``,
``restrained_uncertainty``, ``grouped_uncertainty``, ``dwa``, ``rlw``, ``famo``, ``gradnorm``.

Each is checked against a hand-computed formula or torchjd's implementation, with absent tasks,
a ``state_dict`` round trip, the cross-process rule (statistics averaged over processes before
they update state) and bad kwargs."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchjd import scalarization as torchjd_scalarization

from tests.unit.weighting.test_weighting import TinyModel
from unirep.losses.bundle import LossBundle
from unirep.weighting import (
    DWAWeighting,
    FAMOWeighting,
    GradNormWeighting,
    GroupedUncertaintyWeighting,
    LossWeighting,
    RestrainedUncertaintyWeighting,
    RLWWeighting,
    StaticWeighting,
    UncertaintyWeighting,
    Weighting,
    build_weighting,
)
from unirep.weighting.rlw import DISTRIBUTIONS

TASKS = ["a", "b", "c"]
NEW = [
    "uncertainty",
    "static",
    "restrained_uncertainty",
    "grouped_uncertainty",
    "dwa",
    "rlw",
    "famo",
    "gradnorm",
]


class FakeAccelerator:
    """One process: ``backward`` divides by the accumulation steps; ``reduce`` is the identity."""

    num_processes = 1
    sync_gradients = True
    scaler = None

    def __init__(self, gradient_accumulation_steps: int = 1) -> None:
        self.gradient_accumulation_steps = gradient_accumulation_steps

    def backward(self, loss: Tensor) -> None:
        (loss / self.gradient_accumulation_steps).backward()

    def reduce(self, tensor: Tensor, reduction: str = "sum") -> Tensor:
        return tensor


class RecordingAccelerator(FakeAccelerator):
    """The *other* process of a two-process run: records what it hands to ``reduce``."""

    num_processes = 2

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[Tensor] = []

    def reduce(self, tensor: Tensor, reduction: str = "sum") -> Tensor:
        assert reduction == "mean"
        self.sent.append(tensor.clone())
        return tensor


class PairedAccelerator(FakeAccelerator):
    """Process 0 of a two-process run: ``reduce`` averages with what the other process sent, in
    the same order (an all-reduce of two fixed tensors)."""

    num_processes = 2

    def __init__(self, other: RecordingAccelerator) -> None:
        super().__init__()
        self.other = other
        self.calls = 0

    def reduce(self, tensor: Tensor, reduction: str = "sum") -> Tensor:
        assert reduction == "mean"
        out = (tensor + self.other.sent[self.calls]) / 2
        self.calls += 1
        return out


def _model(tasks: list[str] = TASKS) -> TinyModel:
    torch.manual_seed(0)
    return TinyModel(tasks)


def _data(seed: int = 1, tasks: list[str] = TASKS) -> tuple[Tensor, dict[str, Tensor]]:
    """Inputs and targets of different scales, so the tasks' losses differ."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, generator=gen)
    base = torch.randn(6, generator=gen)
    targets = {t: (-1.0) ** i * (i + 1.0) * (2.0 * base + 1.0) for i, t in enumerate(tasks)}
    return x, targets


def _losses(model: nn.Module, x: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
    out = model(x)
    return {t: ((out[t] - y) ** 2).mean() for t, y in targets.items()}


def _scalars(**values: float) -> dict[str, Tensor]:
    return {k: torch.tensor(v, requires_grad=True) for k, v in values.items()}


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --- every new weighting -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_each_new_weighting_trains_and_logs(name: str) -> None:
    model = _model()
    model.weighting = build_weighting(name, TASKS)
    x, targets = _data()
    out = model(x)
    bundle = LossBundle(
        supervised={t: ((out[t] - y) ** 2).mean() for t, y in targets.items()},
        distill={"a": {"feature": 0.1 * out["a"].pow(2).mean()}},
        joint={"j": 0.05 * (out["a"] + out["b"]).pow(2).mean()},
    )
    logs = model.weighting.backward(bundle, list(model.trunk.parameters()), FakeAccelerator())
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    assert {f"weight/{t}" for t in TASKS} <= set(logs)
    assert all(math.isfinite(v) for v in logs.values())
    optimized = {id(p) for p in model.weighting.optimized_parameters()}
    assert optimized == {id(p) for p in model.weighting.parameters()}
    model.weighting.after_step(_losses(model, x, targets), FakeAccelerator())
    assert all(
        torch.isfinite(v).all()
        for v in model.weighting.state_dict().values()
        if v.is_floating_point()
    )


@pytest.mark.parametrize("name", NEW)
def test_unknown_kwargs_name_the_weighting(name: str) -> None:
    with pytest.raises(TypeError, match=rf"cannot build weighting '{name}'.*bogus"):
        build_weighting(name, TASKS, bogus=1)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("uncertainty", {"init": "x"}, "init must be a number"),
        ("static", {"weights": {"a": 2.0, "zz": 1.0, "yy": 3.0}}, r"\['yy', 'zz'\].*'a', 'b', 'c'"),
        ("static", {"weights": {"a": -1.0}}, r"weights\['a'\] must be >= 0"),
        ("static", {"weights": [1.0, 2.0]}, "weights must map task names"),
        ("restrained_uncertainty", {"init": 0.0}, r"\|init\| >= 0.001"),
        ("restrained_uncertainty", {"dwa": "yes"}, "dwa must be true or false"),
        ("restrained_uncertainty", {"dwa": True, "temperature": 0}, "temperature must be > 0"),
        ("grouped_uncertainty", {"groups": [["a", "zz"]]}, r"unknown tasks \['zz'\].*'a', 'b'"),
        ("grouped_uncertainty", {"groups": [["a", "b"], ["b"]]}, r"tasks \['b'\] more than once"),
        ("grouped_uncertainty", {"groups": [["a"], []]}, "empty group"),
        ("grouped_uncertainty", {"groups": "a,b"}, "list of lists"),
        ("dwa", {"temperature": 0.0}, "temperature must be > 0"),
        ("dwa", {"period": 0}, "period must be an integer >= 1"),
        ("dwa", {"period": 2.5}, "period must be an integer >= 1"),
        (
            "rlw",
            {"distribution": "gauss"},
            "gaussian, uniform, dirichlet, random_normal, bernoulli",
        ),
        ("rlw", {"scale": "total"}, "scale must be 'mean'"),
        ("rlw", {"seed": 1.5}, "seed must be an integer"),
        ("famo", {"lr": -0.1}, "lr must be >= 0"),
        ("famo", {"min_losses": {"zz": 0.0}}, r"unknown tasks \['zz'\]"),
        ("gradnorm", {"alpha": -1}, "alpha must be >= 0"),
        ("gradnorm", {"lr": "fast"}, "lr must be a number"),
    ],
)
def test_bad_kwargs_fail_clearly(name: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_weighting(name, TASKS, **kwargs)


# --- uncertainty ---------------------------------------------------------------------------------


def test_uncertainty_is_torchjd_uw_on_full_bundles() -> None:
    ours = build_weighting("uncertainty", TASKS)
    theirs = torchjd_scalarization.UW(len(TASKS))
    s = torch.tensor([0.3, -0.7, 1.1])
    with torch.no_grad():
        ours.log_var.copy_(s)
        theirs.log_var.copy_(s)
    mine, ref = _scalars(a=1.5, b=0.4, c=2.5), _scalars(a=1.5, b=0.4, c=2.5)
    value = ours.combine(LossBundle(supervised=mine))
    expected = theirs(torch.stack([ref[t] for t in TASKS]))
    torch.testing.assert_close(value, expected)
    value.backward()
    expected.backward()
    torch.testing.assert_close(ours.log_var.grad, theirs.log_var.grad)
    for t in TASKS:
        torch.testing.assert_close(mine[t].grad, ref[t].grad)
    weights = ours.weights()
    for i, t in enumerate(TASKS):
        assert weights[t] == pytest.approx(0.5 * math.exp(-s[i].item()), rel=1e-6)


def test_uncertainty_starts_at_weight_one_and_ignores_absent_tasks() -> None:
    weighting = build_weighting("uncertainty", TASKS)
    assert isinstance(weighting, UncertaintyWeighting)
    assert weighting.log_var[0].item() == pytest.approx(-math.log(2))
    assert weighting.weights() == {"a": 1.0, "b": 1.0, "c": 1.0}
    losses = _scalars(a=2.0, j=0.7)
    value = weighting.combine(LossBundle(supervised={"a": losses["a"]}, joint={"j": losses["j"]}))
    assert value.item() == pytest.approx(2.0 - 0.5 * math.log(2) + 0.7, rel=1e-6)
    value.backward()
    # d/ds [½e^{-s}L + ½s] = ½ − ½e^{-s}L = ½ − 2 at weight 1; absent tasks: 0
    torch.testing.assert_close(weighting.log_var.grad, torch.tensor([-1.5, 0.0, 0.0]))
    assert losses["a"].grad.item() == pytest.approx(1.0)
    assert losses["j"].grad.item() == 1.0
    with pytest.raises(KeyError, match="'z'"):
        weighting.combine(LossBundle(supervised={"z": losses["a"]}))
    libmtl = build_weighting("uncertainty", TASKS, init=-0.5)
    assert libmtl.weights()["a"] == pytest.approx(0.5 * math.exp(0.5))


# --- static --------------------------------------------------------------------------------------


def test_static_weights_by_hand() -> None:
    weighting = build_weighting("static", TASKS, weights={"a": 2.0, "c": 0.25})
    assert isinstance(weighting, StaticWeighting)
    assert weighting.weights() == {"a": 2.0, "b": 1.0, "c": 0.25}
    losses = _scalars(a=1.5, b=0.4, f=0.2, j=0.7)
    bundle = LossBundle(
        supervised={"a": losses["a"], "b": losses["b"]},
        distill={"a": {"feature": losses["f"]}},
        joint={"j": losses["j"]},
    )  # c absent
    value = weighting.combine(bundle)
    assert value.item() == pytest.approx(2.0 * (1.5 + 0.2) + 0.4 + 0.7, rel=1e-6)
    value.backward()
    assert [losses[k].grad.item() for k in "abfj"] == [2.0, 1.0, 2.0, 1.0]
    assert weighting.state_dict() == {}


# --- restrained_uncertainty ----------------------------------------------------------------------


def test_restrained_uncertainty_by_hand() -> None:
    weighting = build_weighting("restrained_uncertainty", TASKS, phi=1.2)
    assert isinstance(weighting, RestrainedUncertaintyWeighting)
    torch.testing.assert_close(weighting.sigma.detach(), torch.full((3,), 1 / 3))
    assert weighting.weights()["a"] == pytest.approx(3.0)  # 1/(T·(1/T)²) = T
    sigma = torch.tensor([0.5, -0.2, 0.9])
    with torch.no_grad():
        weighting.sigma.copy_(sigma)
    losses = _scalars(a=1.5, b=0.4, j=0.7)
    value = weighting.combine(
        LossBundle(supervised={"a": losses["a"], "b": losses["b"]}, joint={"j": losses["j"]})
    )  # c absent
    ref = sigma.clone().requires_grad_(True)
    expected = (
        1.5 / (3 * ref[0] ** 2) + torch.log(1 + ref[0] ** 2)
        + 0.4 / (3 * ref[1] ** 2) + torch.log(1 + ref[1] ** 2)
        + (1.2 - ref.abs().sum()).abs()
        + 0.7
    )  # fmt: skip
    torch.testing.assert_close(value, expected)
    value.backward()
    expected.backward()
    torch.testing.assert_close(weighting.sigma.grad, ref.grad)
    # the absent task's σ moves only through the restraint: -sign(φ − Σ|σ|)·sign(σ_c) = +1 here
    assert weighting.sigma.grad[2].item() == pytest.approx(1.0)
    assert losses["a"].grad.item() == pytest.approx(1 / (3 * 0.25))
    weights = weighting.weights()
    assert weights["b"] == pytest.approx(1 / (3 * 0.04), rel=1e-6)
    with torch.no_grad():  # σ = 0: the weight is capped by the clamp |σ| >= 1e-3
        weighting.sigma.zero_()
    assert weighting.weights()["a"] == pytest.approx(1e6 / 3, rel=1e-4)
    assert torch.isfinite(weighting.combine(LossBundle(supervised={"a": losses["a"]})))


def test_restrained_uncertainty_with_dwa_uses_the_previous_two_steps() -> None:
    weighting = build_weighting("restrained_uncertainty", ["a", "b"], dwa=True)
    inverse = 1 / (2 * 0.5**2)  # σ = 1/T = 0.5
    stream = [(2.0, 1.0), (1.5, 0.9), (1.2, 0.3), (1.1, 0.2)]
    seen = []
    for step, (la, lb) in enumerate(stream):
        for _ in range(2):  # two micro-batches per step with the same losses
            weighting.combine(LossBundle(supervised=_scalars(a=la, b=lb)))
        seen.append(weighting.weights())
        weighting.after_step({}, FakeAccelerator())
        assert int(weighting.dwa.steps) == step + 1
    for w in seen[:2]:  # λ = 1 for the first two steps
        assert w["a"] == pytest.approx(1 + inverse)
    for k in (2, 3):
        ratio = torch.tensor(
            [stream[k - 1][0] / stream[k - 2][0], stream[k - 1][1] / stream[k - 2][1]]
        )
        lam = 2 * torch.softmax(ratio / 10.0, dim=0)
        assert seen[k]["a"] == pytest.approx(lam[0].item() + inverse, rel=1e-6)
        assert seen[k]["b"] == pytest.approx(lam[1].item() + inverse, rel=1e-6)
    clone = build_weighting("restrained_uncertainty", ["a", "b"], dwa=True)
    clone.load_state_dict(weighting.state_dict())
    _same_state(clone, weighting)


# --- grouped_uncertainty -------------------------------------------------------------------------


def test_grouped_uncertainty_by_hand_and_absent_groups() -> None:
    weighting = build_weighting("grouped_uncertainty", ["a", "b", "c", "d"], groups=[["b", "a"]])
    assert isinstance(weighting, GroupedUncertaintyWeighting)
    assert weighting.groups == [["b", "a"], ["c"], ["d"]]
    assert weighting.weights() == {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}
    s = torch.tensor([0.4, -0.3, 0.2])
    with torch.no_grad():
        weighting.log_var.copy_(s)
    losses = _scalars(a=1.5, b=0.4, c=2.0, j=0.7)
    value = weighting.combine(
        LossBundle(supervised={t: losses[t] for t in "abc"}, joint={"j": losses["j"]})
    )
    expected = (
        0.5 * math.exp(-0.4) * (1.5 + 0.4) + 0.2 + 0.5 * math.exp(0.3) * 2.0 - 0.15 + 0.7
    )  # group d absent: no ½·s_d
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    expected_grad = [0.5 - 0.5 * math.exp(-0.4) * 1.9, 0.5 - 0.5 * math.exp(0.3) * 2.0, 0.0]
    torch.testing.assert_close(weighting.log_var.grad, torch.tensor(expected_grad))
    assert losses["a"].grad.item() == pytest.approx(0.5 * math.exp(-0.4))
    weights = weighting.weights()
    assert weights["a"] == weights["b"] == pytest.approx(0.5 * math.exp(-0.4))
    assert weights["d"] == pytest.approx(0.5 * math.exp(-0.2))


def test_grouped_uncertainty_without_groups_is_uncertainty() -> None:
    grouped, plain = (
        build_weighting("grouped_uncertainty", TASKS),
        build_weighting("uncertainty", TASKS),
    )
    with torch.no_grad():
        grouped.log_var.copy_(torch.tensor([0.1, 0.2, -0.3]))
        plain.log_var.copy_(torch.tensor([0.1, 0.2, -0.3]))
    bundle = LossBundle(supervised=_scalars(a=1.0, b=2.0, c=3.0))
    a, b = grouped.combine(bundle), plain.combine(bundle)
    assert torch.equal(a, b)
    a.backward()
    b.backward()
    assert torch.equal(grouped.log_var.grad, plain.log_var.grad)


# --- dwa -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("accumulation", [1, 2])
def test_dwa_is_torchjd_dwa_on_the_same_loss_stream(accumulation: int) -> None:
    period, steps = 2, 9
    ours = build_weighting("dwa", TASKS, period=period)
    assert isinstance(ours, DWAWeighting)
    theirs = torchjd_scalarization.DWA(temperature=2.0)
    gen = torch.Generator().manual_seed(3)
    for step in range(steps):
        for _ in range(accumulation):
            values = torch.rand(3, generator=gen) + 0.1
            mine = {t: values[i].clone().requires_grad_(True) for i, t in enumerate(TASKS)}
            value = ours.combine(LossBundle(supervised=mine))
            expected = theirs(values.clone())
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        ours.after_step({}, FakeAccelerator())
        if (step + 1) % period == 0:
            theirs.step()
        expected_weights = theirs._compute_weights(torch.zeros(3))
        torch.testing.assert_close(ours.lambdas, expected_weights, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours.lambdas, torch.ones(3))  # the dynamic part was reached
    assert ours.lambdas.sum().item() == pytest.approx(3.0)


def test_dwa_absent_task_keeps_its_average_and_state_stays_finite() -> None:
    weighting = build_weighting("dwa", ["a", "b"], period=1)
    stream = [{"a": 2.0, "b": 1.0}, {"a": 1.0}, {"a": 0.5, "b": 0.5}, {"a": 0.25, "b": 0.25}]
    lambdas = []
    for losses in stream:
        weighting.combine(LossBundle(supervised=_scalars(**losses)))
        weighting.after_step({}, FakeAccelerator())
        lambdas.append(weighting.lambdas.clone())
        for value in weighting.state_dict().values():
            assert not value.is_floating_point() or torch.isfinite(value).all()
    # period 2: b absent, its average stays 1.0; ratios a: 1/2, b: 1/1 (b carried forward)
    torch.testing.assert_close(lambdas[1], 2 * torch.softmax(torch.tensor([0.5, 1.0]) / 2, dim=0))
    # period 3: a: 0.5/1, b: 0.5/1.0
    torch.testing.assert_close(lambdas[2], torch.ones(2))
    # a non-finite loss (a skipped step) adds nothing
    before = weighting.sums.clone()
    weighting.combine(LossBundle(supervised=_scalars(a=float("nan"), b=float("inf"))))
    assert torch.equal(weighting.sums, before)


def test_dwa_averages_over_processes_and_resumes() -> None:
    other, ours = RecordingAccelerator(), None
    stream0 = [{"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 2.0}, {"a": 0.5, "b": 1.5}]
    stream1 = [{"a": 4.0}, {"a": 3.0, "b": 2.0}, {"b": 1.0}]  # the other process
    remote = build_weighting("dwa", ["a", "b"], period=1)
    for losses in stream1:
        remote.combine(LossBundle(supervised=_scalars(**losses)), other)
        remote.after_step({}, other)
    ours = build_weighting("dwa", ["a", "b"], period=1)
    paired = PairedAccelerator(other)
    for losses in stream0:
        ours.combine(LossBundle(supervised=_scalars(**losses)), paired)
        ours.after_step({}, paired)
    # a single process on the pooled losses: per-task means over the processes that have the task
    pooled = [{"a": 3.0, "b": 1.0}, {"a": 2.0, "b": 2.0}, {"a": 0.5, "b": 1.25}]
    single = build_weighting("dwa", ["a", "b"], period=1)
    for losses in pooled:
        single.combine(LossBundle(supervised=_scalars(**losses)))
        single.after_step({}, FakeAccelerator())
    torch.testing.assert_close(ours.history, single.history)
    torch.testing.assert_close(ours.lambdas, single.lambdas)
    # resume mid-period: the clone continues exactly as the original
    original = build_weighting("dwa", ["a", "b"], period=3)
    for losses in pooled[:2]:
        original.combine(LossBundle(supervised=_scalars(**losses)))
        original.after_step({}, FakeAccelerator())
    clone = build_weighting("dwa", ["a", "b"], period=3)
    clone.load_state_dict(original.state_dict())
    for w in (original, clone):
        for losses in pooled * 2:
            w.combine(LossBundle(supervised=_scalars(**losses)))
            w.after_step({}, FakeAccelerator())
    _same_state(original, clone)


# --- rlw -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("scale", ["mean", "sum"])
def test_rlw_draws_on_the_scaled_simplex(distribution: str, scale: str) -> None:
    weighting = build_weighting("rlw", TASKS, distribution=distribution, scale=scale, seed=5)
    assert isinstance(weighting, RLWWeighting)
    total = 1.0 if scale == "mean" else 3.0
    draws = []
    for _ in range(20):
        lam = weighting.lambdas.clone()
        assert (lam >= 0).all()
        assert lam.sum().item() == pytest.approx(total, rel=1e-6)
        if distribution == "constrained_bernoulli":
            assert sorted(lam.tolist()) == [0.0, 0.0, total]
        if distribution == "bernoulli":
            k = int((lam > 0).sum())
            assert all(v in (0.0, pytest.approx(total / k)) for v in lam.tolist())
        draws.append(lam)
        weighting.after_step({}, FakeAccelerator())
    assert len({tuple(d.tolist()) for d in draws}) > 1


def test_rlw_is_seeded_reproducible_on_resume_and_leaves_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    weighting = build_weighting("rlw", TASKS, seed=7)
    expected = torch.softmax(torch.randn(3, generator=torch.Generator().manual_seed(7)), dim=0)
    assert torch.equal(weighting.lambdas, expected)
    weighting.after_step({}, FakeAccelerator())
    expected = torch.softmax(torch.randn(3, generator=torch.Generator().manual_seed(8)), dim=0)
    assert torch.equal(weighting.lambdas, expected)
    losses = _scalars(a=1.5, c=0.5, j=0.7)
    value = weighting.combine(
        LossBundle(supervised={"a": losses["a"], "c": losses["c"]}, joint={"j": losses["j"]})
    )
    lam = weighting.lambdas
    assert value.item() == pytest.approx((lam[0] * 1.5 + lam[2] * 0.5).item() + 0.7, rel=1e-6)
    clone = build_weighting("rlw", TASKS, seed=7)
    clone.load_state_dict(weighting.state_dict())
    for w in (weighting, clone):
        for _ in range(3):
            w.after_step({}, FakeAccelerator())
    _same_state(weighting, clone)
    random_normal = build_weighting("rlw", TASKS, distribution="random_normal", seed=7)
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(random_normal.mu, torch.rand(3, generator=gen))
    assert int(random_normal.calls) == 2  # μ, σ are draw 0, the first weights draw 1
    assert torch.equal(torch.random.get_rng_state(), state)


# --- famo ----------------------------------------------------------------------------------------


def test_famo_matches_torchjd_on_a_tiny_model() -> None:
    ours_model, ref_model = _model(), _model()
    ours = build_weighting("famo", TASKS)
    assert isinstance(ours, FAMOWeighting)
    assert ours.optimized_parameters() == [] and list(ours.parameters()) == []
    ours_model.weighting = ours
    theirs = torchjd_scalarization.FAMO(3)
    ours_opt = torch.optim.SGD(ours_model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    acc = FakeAccelerator()
    for step in range(4):
        x, targets = _data(seed=10 + step)
        bundle = LossBundle(supervised=_losses(ours_model, x, targets))
        ours.backward(bundle, list(ours_model.trunk.parameters()), acc)
        ours_opt.step()
        ours_opt.zero_grad()
        ref_losses = _losses(ref_model, x, targets)
        theirs(torch.stack([ref_losses[t] for t in TASKS])).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        with torch.no_grad():
            after = _losses(ours_model, x, targets)
            ref_after = _losses(ref_model, x, targets)
        ours.after_step(after, acc)
        theirs.update(torch.stack([ref_after[t] for t in TASKS]))
        torch.testing.assert_close(ours.w, theirs._w.detach(), rtol=1e-5, atol=1e-7)
        for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters(), strict=True):
            torch.testing.assert_close(p, q, msg=name)
    assert not torch.equal(ours.w, torch.zeros(3))
    assert int(ours.adam_steps[0]) == 4


def test_famo_absent_task_is_left_alone() -> None:
    weighting = build_weighting("famo", TASKS)
    for losses, after in [({"a": 2.0, "b": 1.0}, {"a": 1.5, "b": 0.9})] * 2:
        weighting.combine(LossBundle(supervised=_scalars(**losses)))
        weighting.after_step(_scalars(**after), FakeAccelerator())
    assert (
        weighting.w[2] == 0
        and weighting.exp_avg[2] == 0
        and weighting.adam_steps.tolist() == [2, 2, 0]
    )
    assert weighting.w[0] != 0
    # only a and b: the same as a two-task FAMO
    two = build_weighting("famo", ["a", "b"])
    for _ in range(2):
        two.combine(LossBundle(supervised=_scalars(a=2.0, b=1.0)))
        two.after_step(_scalars(a=1.5, b=0.9), FakeAccelerator())
    torch.testing.assert_close(weighting.w[:2], two.w)
    # the combination uses the present tasks only: c = (Σ_present z/ℓ)⁻¹
    losses = _scalars(a=2.0, b=1.0)
    value = weighting.combine(LossBundle(supervised=losses, joint={"j": torch.tensor(0.5)}))
    z = torch.softmax(weighting.w, dim=0)[:2]
    ell = torch.tensor([2.0, 1.0]) + 1e-8
    expected = (z / (z / ell).sum() * torch.log(ell)).sum() + 0.5
    torch.testing.assert_close(value, expected)
    # a task present before but not after, and a bad loss: no update, no NaN
    w = weighting.w.clone()
    weighting.after_step(_scalars(c=1.0), FakeAccelerator())
    weighting.combine(LossBundle(supervised=_scalars(a=float("nan"), b=1.0)))
    weighting.after_step(_scalars(a=1.0, b=1.0), FakeAccelerator())
    assert torch.equal(weighting.w[0], w[0]) and torch.equal(weighting.w[2], w[2])
    assert all(
        torch.isfinite(v).all() for v in weighting.state_dict().values() if v.is_floating_point()
    )


def test_famo_averages_over_processes_before_the_update() -> None:
    other = RecordingAccelerator()
    remote = build_weighting("famo", ["a", "b"])
    remote.combine(LossBundle(supervised=_scalars(a=3.0, b=2.0)), other)
    remote.after_step(_scalars(a=2.0, b=1.9), other)
    ours = build_weighting("famo", ["a", "b"])
    paired = PairedAccelerator(other)
    ours.combine(LossBundle(supervised=_scalars(a=1.0, b=1.0)), paired)
    ours.after_step(_scalars(a=0.5, b=0.9), paired)
    single = build_weighting("famo", ["a", "b"])
    single.combine(LossBundle(supervised=_scalars(a=2.0, b=1.5)))
    single.after_step(_scalars(a=1.25, b=1.4), FakeAccelerator())
    torch.testing.assert_close(ours.before, single.before)
    torch.testing.assert_close(ours.w, single.w)
    assert not torch.equal(ours.w, remote.w)  # the recording side did not average


def test_famo_resumes_bit_exactly() -> None:
    original = build_weighting("famo", TASKS)
    stream = [
        ({"a": 2.0, "b": 1.0, "c": 3.0}, {"a": 1.5, "b": 0.9, "c": 2.9}),
        ({"a": 1.4, "b": 0.8, "c": 2.8}, {"a": 1.3, "b": 0.75, "c": 2.0}),
    ]
    for losses, after in stream:
        original.combine(LossBundle(supervised=_scalars(**losses)))
        original.after_step(_scalars(**after), FakeAccelerator())
    clone = build_weighting("famo", TASKS)
    clone.load_state_dict(original.state_dict())
    for w in (original, clone):
        for losses, after in stream:
            w.combine(LossBundle(supervised=_scalars(**losses)))
            w.after_step(_scalars(**after), FakeAccelerator())
    _same_state(original, clone)


# --- gradnorm ------------------------------------------------------------------------------------


def _gradnorm_reference(
    steps: int, alpha: float = 1.5, lr: float = 0.025
) -> tuple[Tensor, TinyModel]:
    """Chen et al. with autograd: G_i = ‖∇_W (w_i L_i)‖ (create_graph), L_grad against the
    detached target, torch's Adam on w, renormalised to Σw = T; the model takes SGD steps on
    Σ w_i L_i + joint."""
    model = _model()
    w = torch.ones(3, requires_grad=True)
    w_opt = torch.optim.Adam([w], lr=lr)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    initial = None
    for step in range(steps):
        x, targets = _data(seed=20 + step)
        out = model(x)
        losses = torch.stack([((out[t] - targets[t]) ** 2).mean() for t in TASKS])
        joint = 0.05 * (out["a"] + out["b"]).pow(2).mean()
        layer = model.trunk.weight
        grads = [
            torch.autograd.grad(w[i] * losses[i], layer, retain_graph=True, create_graph=True)[0]
            for i in range(3)
        ]
        norms = torch.stack([g.norm() for g in grads])
        if initial is None:
            initial = losses.detach().clone()
        ratio = losses.detach() / initial
        target = (norms.mean() * (ratio / ratio.mean()) ** alpha).detach()
        (w_grad,) = torch.autograd.grad((norms - target).abs().sum(), w, retain_graph=True)
        ((w.detach() * losses).sum() + joint).backward()
        opt.step()
        opt.zero_grad()
        w.grad = w_grad
        w_opt.step()
        with torch.no_grad():
            w.clamp_(min=1e-6)
            w.mul_(3 / w.sum())
    return w.detach(), model


def test_gradnorm_matches_the_autograd_reference() -> None:
    model = _model()
    weighting = build_weighting("gradnorm", TASKS)
    assert isinstance(weighting, GradNormWeighting) and isinstance(weighting, Weighting)
    assert not isinstance(weighting, LossWeighting)
    assert weighting.optimized_parameters() == []
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = FakeAccelerator()
    for step in range(3):
        x, targets = _data(seed=20 + step)
        out = model(x)
        bundle = LossBundle(
            supervised={t: ((out[t] - y) ** 2).mean() for t, y in targets.items()},
            joint={"j": 0.05 * (out["a"] + out["b"]).pow(2).mean()},
        )
        logs = weighting.backward(bundle, list(model.trunk.parameters()), acc)
        assert set(logs) == {f"{k}/{t}" for k in ("weight", "gradnorm") for t in TASKS}
        opt.step()
        opt.zero_grad()
        weighting.after_step({}, acc)
    w_ref, model_ref = _gradnorm_reference(3)
    torch.testing.assert_close(weighting.w, w_ref, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), model_ref.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert weighting.w.sum().item() == pytest.approx(3.0)
    assert not torch.allclose(weighting.w, torch.ones(3))


def test_gradnorm_absent_task_accumulation_and_resume() -> None:
    model = _model()
    weighting = build_weighting("gradnorm", TASKS)
    shared = list(model.trunk.parameters())
    assert weighting.last_shared_layer(shared) is model.trunk.weight
    with pytest.raises(ValueError, match="shared weight matrix"):
        weighting.last_shared_layer([model.trunk.bias])
    acc = FakeAccelerator(gradient_accumulation_steps=2)
    x, targets = _data()
    for _ in range(2):  # one step of two micro-batches, task c absent
        losses = _losses(model, x, {t: targets[t] for t in "ab"})
        weighting.backward(LossBundle(supervised=losses), shared, acc)
    assert weighting.grad_count.tolist() == [2.0, 2.0, 0.0]
    assert weighting.initial_known.tolist() == [True, True, False]
    weighting.after_step({}, acc)
    assert weighting.adam_steps.tolist() == [1, 1, 0] and weighting.exp_avg[2] == 0
    assert weighting.w.sum().item() == pytest.approx(3.0)
    assert all(
        torch.isfinite(v).all() for v in weighting.state_dict().values() if v.is_floating_point()
    )
    clone = build_weighting("gradnorm", TASKS)
    clone.load_state_dict(weighting.state_dict())
    for w in (weighting, clone):
        model.zero_grad()
        w.backward(LossBundle(supervised=_losses(model, x, targets)), shared, FakeAccelerator())
        w.after_step({}, FakeAccelerator())
    _same_state(weighting, clone)


def test_gradnorm_averages_norms_and_losses_over_processes() -> None:
    model = _model()
    shared = list(model.trunk.parameters())
    x0, t0 = _data(seed=30)
    x1, t1 = _data(seed=31)
    other = RecordingAccelerator()
    build_weighting("gradnorm", TASKS).backward(
        LossBundle(supervised=_losses(model, x1, t1)), shared, other
    )
    ours = build_weighting("gradnorm", TASKS)
    ours.backward(LossBundle(supervised=_losses(model, x0, t0)), shared, PairedAccelerator(other))

    def stats(x: Tensor, targets: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        losses = _losses(model, x, targets)
        norms = [
            torch.autograd.grad(losses[t], model.trunk.weight, retain_graph=True)[0].norm()
            for t in TASKS
        ]
        return torch.stack([losses[t] for t in TASKS]).detach(), torch.stack(norms)

    (l0, n0), (l1, n1) = stats(x0, t0), stats(x1, t1)
    loss, norm = (l0 + l1) / 2, (n0 + n1) / 2
    torch.testing.assert_close(ours.initial, loss)
    ratio = loss / loss  # first step: L(0) = L
    target = norm.mean() * (ratio / ratio.mean()) ** 1.5
    torch.testing.assert_close(ours.grad_sum, torch.sign(norm - target) * norm)
