"""Weightings on a tiny two-task model (shared linear trunk, one head per task), on CPU."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchjd.aggregation import PCGrad as TorchJDPCGrad

from unirep.losses.bundle import LossBundle
from unirep.registry import UnknownNameError
from unirep.weighting import (
    WEIGHTINGS,
    GradientWeighting,
    LossWeighting,
    UncertaintyWeighting,
    Weighting,
    build_weighting,
)

TASKS = ["a", "b"]


class FakeAccelerator:
    """One process: ``backward`` divides by the accumulation steps (and scales like a
    GradScaler when given a scale), ``reduce`` is the identity. ``sync_gradients`` (True unless
    the test sets it) says whether this micro-batch ends the accumulation window."""

    num_processes = 1

    def __init__(self, gradient_accumulation_steps: int = 1, scale: float | None = None) -> None:
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.scaler = None if scale is None else _FakeScaler(scale)
        self.sync_gradients = True

    def backward(self, loss: Tensor) -> None:
        loss = loss / self.gradient_accumulation_steps
        if self.scaler is not None:
            loss = loss * self.scaler.get_scale()
        loss.backward()

    def reduce(self, tensor: Tensor, reduction: str = "sum") -> Tensor:
        return tensor


class _FakeScaler:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def get_scale(self) -> float:
        return self.scale


class TinyModel(nn.Module):
    """``[B, 4] → trunk (linear, tanh) → [B, 3] → head_t → [B]`` for each task ``t``; the last
    forward's trunk output is :attr:`z` (``bundle.shared``, for ``mgda_ub``)."""

    def __init__(self, tasks: list[str] = TASKS) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 3)
        self.heads = nn.ModuleDict({t: nn.Linear(3, 1) for t in tasks})
        self.z: Tensor | None = None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = torch.tanh(self.trunk(x))
        self.z = z
        return {t: head(z).squeeze(-1) for t, head in self.heads.items()}


def _model(tasks: list[str] = TASKS) -> TinyModel:
    torch.manual_seed(0)
    return TinyModel(tasks)


def _data(seed: int = 1, tasks: list[str] = TASKS) -> tuple[Tensor, dict[str, Tensor]]:
    """Inputs and targets; task b's target is the negation of a's, so their gradients conflict."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, generator=gen)
    base = torch.randn(6, generator=gen)
    targets = {t: (-1.0) ** i * (2.0 * base + 1.0) for i, t in enumerate(tasks)}
    return x, targets


def _losses(model: nn.Module, x: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
    out = model(x)
    return {t: ((out[t] - y) ** 2).mean() for t, y in targets.items()}


def _bundle(model: TinyModel, x: Tensor, targets: dict[str, Tensor], **extra: Any) -> LossBundle:
    """The supervised losses, with the trunk output as ``shared`` (what mgda_ub reads)."""
    supervised = _losses(model, x, targets)
    return LossBundle(supervised=supervised, shared=[model.z], **extra)


def _rich_bundle(model: TinyModel, x: Tensor, targets: dict[str, Tensor]) -> LossBundle:
    """Supervised terms, a distillation term on task a and a joint term."""
    out = model(x)
    supervised = {t: ((out[t] - y) ** 2).mean() for t, y in targets.items()}
    return LossBundle(
        supervised=supervised,
        distill={"a": {"feature": 0.1 * out["a"].pow(2).mean()}},
        joint={"consistency": 0.05 * (out["a"] + out["b"]).pow(2).mean()},
        shared=[model.z],
    )


def _shared(model: TinyModel) -> list[nn.Parameter]:
    return list(model.trunk.parameters())


def _flat(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def _task_grad(task: str, x: Tensor, targets: dict[str, Tensor], scale: float = 1.0) -> Tensor:
    """Naive per-task shared gradient: a fresh model, its own forward and backward."""
    model = _model(list(targets))
    (_losses(model, x, targets)[task] * scale).backward()
    return _flat(_shared(model))


def _pcgrad_two(g_a: Tensor, g_b: Tensor) -> Tensor:
    """Yu et al. 2020, Alg. 1 for two tasks, summed like torchjd's PCGrad: each gradient that
    conflicts with the other is projected onto the other's normal plane."""
    dot = g_a @ g_b
    if dot >= 0:
        return g_a + g_b
    return (g_a - dot / (g_b @ g_b) * g_b) + (g_b - dot / (g_a @ g_a) * g_a)


def _cos(g_a: Tensor, g_b: Tensor) -> float:
    return float(g_a @ g_b / (g_a.norm() * g_b.norm()))


# --- every registered weighting ------------------------------------------------------------------


def test_registry_holds_the_methods() -> None:
    assert {"sum", "mean", "uncertainty", "pcgrad"} <= set(WEIGHTINGS.names())
    with pytest.raises(UnknownNameError, match=r"valid choices: .*pcgrad"):
        build_weighting("nope", TASKS)


THREE_TASKS = ("krum",)  # needs n_byzantine + 3 tasks


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_weighting_sends_finite_gradients_to_every_parameter(name: str) -> None:
    tasks = [*TASKS, "c"] if name in THREE_TASKS else TASKS
    model = _model(tasks)
    model.weighting = build_weighting(name, tasks)  # the weighting sits in the trainable module
    assert isinstance(model.weighting, Weighting)
    x, targets = _data(tasks=tasks)
    logs = model.weighting.backward(
        _rich_bundle(model, x, targets), _shared(model), FakeAccelerator()
    )
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    assert all(math.isfinite(v) for v in logs.values())
    if isinstance(model.weighting, LossWeighting):
        assert set(logs) == {f"weight/{t}" for t in tasks}


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_weighting_state_round_trips(name: str) -> None:
    tasks = [*TASKS, "c"] if name in THREE_TASKS else TASKS
    weighting = build_weighting(name, tasks)
    clone = build_weighting(name, tasks)
    for p in weighting.parameters():
        p.data.add_(0.25)
    clone.load_state_dict(weighting.state_dict())
    for (k, a), (_, b) in zip(
        weighting.state_dict().items(), clone.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k


# --- sum and mean --------------------------------------------------------------------------------


def test_sum_is_the_bundle_total_bit_for_bit() -> None:
    x, targets = _data()
    model = _model()
    bundle = _rich_bundle(model, x, targets)
    weighting = build_weighting("sum", TASKS)
    assert torch.equal(weighting.combine(bundle), bundle.total())
    assert weighting.weights() == {"a": 1.0, "b": 1.0}

    weighting.backward(bundle, _shared(model), FakeAccelerator())
    plain = _model()
    _rich_bundle(plain, x, targets).total().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_mean_divides_the_task_losses_by_the_number_of_tasks() -> None:
    x, targets = _data()
    model = _model()
    weighting = build_weighting("mean", TASKS)
    bundle = _bundle(model, x, targets)
    torch.testing.assert_close(weighting.combine(bundle), bundle.total() / 2)
    assert weighting.weights() == {"a": 0.5, "b": 0.5}

    rich = _rich_bundle(model, x, targets)
    tasks = rich.task_losses()
    expected = (tasks["a"] + tasks["b"]) / 2 + rich.joint["consistency"]
    torch.testing.assert_close(weighting.combine(rich), expected)


# --- uncertainty ---------------------------------------------------------------------------------


def test_uncertainty_value_gradient_and_weights_by_hand() -> None:
    weighting = build_weighting("uncertainty", TASKS, init=0.3)
    assert isinstance(weighting, UncertaintyWeighting)
    torch.testing.assert_close(weighting.log_var.detach(), torch.tensor([0.3, 0.3]))
    assert [n for n, _ in weighting.named_parameters()] == ["log_var"]
    with torch.no_grad():
        weighting.log_var.copy_(torch.tensor([0.5, -0.2]))
    la = torch.tensor(1.5, requires_grad=True)
    lb = torch.tensor(0.4, requires_grad=True)
    fa = torch.tensor(0.2, requires_grad=True)
    joint = torch.tensor(0.7, requires_grad=True)
    bundle = LossBundle(
        supervised={"a": la, "b": lb}, distill={"a": {"feature": fa}}, joint={"j": joint}
    )
    value = weighting.combine(bundle)
    # Kendall et al. / LibMTL / torchjd's UW: ½ e^{-s} L + ½ s per task, joint terms as is
    expected = 0.5 * math.exp(-0.5) * (1.5 + 0.2) + 0.25 + 0.5 * math.exp(0.2) * 0.4 - 0.1 + 0.7
    assert value.item() == pytest.approx(expected, rel=1e-6)

    value.backward()
    # d/ds [½ e^{-s} L + ½ s] = ½ - ½ e^{-s} L
    expected_grad = torch.tensor(
        [0.5 - 0.5 * math.exp(-0.5) * 1.7, 0.5 - 0.5 * math.exp(0.2) * 0.4]
    )
    torch.testing.assert_close(weighting.log_var.grad, expected_grad)
    assert la.grad.item() == pytest.approx(0.5 * math.exp(-0.5))
    assert fa.grad.item() == pytest.approx(0.5 * math.exp(-0.5))
    assert lb.grad.item() == pytest.approx(0.5 * math.exp(0.2))
    assert joint.grad.item() == 1.0
    weights = weighting.weights()
    assert weights["a"] == pytest.approx(0.5 * math.exp(-0.5))
    assert weights["b"] == pytest.approx(0.5 * math.exp(0.2))


def test_uncertainty_starts_at_weight_one_and_ignores_absent_tasks() -> None:
    weighting = build_weighting("uncertainty", ["a", "b", "c"])  # init s = -log 2: ½e^{-s} = 1
    assert weighting.weights() == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})
    la = torch.tensor(2.0, requires_grad=True)
    value = weighting.combine(LossBundle(supervised={"a": la}))
    assert value.item() == pytest.approx(2.0 - 0.5 * math.log(2))
    value.backward()
    torch.testing.assert_close(weighting.log_var.grad, torch.tensor([0.5 - 2.0, 0.0, 0.0]))
    with pytest.raises(KeyError, match="'z'"):
        weighting.combine(LossBundle(supervised={"z": la}))


def test_uncertainty_is_trained_by_the_ordinary_optimizer() -> None:
    model = _model()
    model.weighting = build_weighting("uncertainty", TASKS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, targets = _data()
    before = model.weighting.log_var.detach().clone()
    model.weighting.backward(_bundle(model, x, targets), _shared(model), FakeAccelerator())
    optimizer.step()
    assert not torch.equal(model.weighting.log_var.detach(), before)
    assert "weighting.log_var" in model.state_dict()


# --- pcgrad --------------------------------------------------------------------------------------


def test_torchjd_pcgrad_sums_the_projected_gradients() -> None:
    """The documented rule we rely on (torchjd 0.18): Alg. 1 of Yu et al., projected rows summed."""
    g_a, g_b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    expected = _pcgrad_two(g_a, g_b)  # [0.5, 0.5] + [0, 1]
    torch.testing.assert_close(expected, torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(TorchJDPCGrad()(torch.stack([g_a, g_b])), expected)
    no_conflict = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(TorchJDPCGrad()(no_conflict), no_conflict.sum(0))


def test_pcgrad_matches_the_naive_per_task_reference() -> None:
    x, targets = _data()
    g_a, g_b = _task_grad("a", x, targets), _task_grad("b", x, targets)
    assert g_a @ g_b < 0, "the data must make the tasks conflict"

    model = _model()
    weighting = build_weighting("pcgrad", TASKS)
    logs = weighting.backward(_bundle(model, x, targets), _shared(model), FakeAccelerator())

    torch.testing.assert_close(_flat(_shared(model)), _pcgrad_two(g_a, g_b))
    torch.testing.assert_close(_flat(_shared(model)), TorchJDPCGrad()(torch.stack([g_a, g_b])))
    plain = _model()
    sum(_losses(plain, x, targets).values()).backward()
    for name in ("heads.a.weight", "heads.a.bias", "heads.b.weight", "heads.b.bias"):
        torch.testing.assert_close(
            model.get_parameter(name).grad, plain.get_parameter(name).grad, msg=name
        )
    assert logs["gradcos/a~b"] == pytest.approx(_cos(g_a, g_b), abs=1e-6)
    # the weight of g_a in the sum: 1, plus what projecting g_b away from g_a adds
    dot = float(g_a @ g_b)
    assert logs["weight/a"] == pytest.approx(1 - dot / float(g_a @ g_a), rel=1e-5)
    assert logs["weight/b"] == pytest.approx(1 - dot / float(g_b @ g_b), rel=1e-5)
    assert int(weighting.calls) == 1


def test_pcgrad_accumulates_over_micro_batches() -> None:
    """One combination per window, of the Jacobian summed over its micro-batches (accumulation
    behaves like a larger batch); nothing is combined, logged or counted before the last."""
    batches = [_data(seed=1), _data(seed=2)]
    model = _model()
    weighting = build_weighting("pcgrad", TASKS)
    accelerator = FakeAccelerator(gradient_accumulation_steps=2)
    for i, (x, targets) in enumerate(batches):
        accelerator.sync_gradients = i == len(batches) - 1
        logs = weighting.backward(_bundle(model, x, targets), _shared(model), accelerator)
        if not accelerator.sync_gradients:
            assert logs == {}
            assert all(p.grad is None for p in _shared(model))
            assert int(weighting.calls) == 0
    assert int(weighting.calls) == 1

    g_a, g_b = (sum(_task_grad(t, x, y, scale=0.5) for x, y in batches) for t in TASKS)
    torch.testing.assert_close(_flat(_shared(model)), _pcgrad_two(g_a, g_b))
    assert logs["gradcos/a~b"] == pytest.approx(_cos(g_a, g_b), abs=1e-6)
    separate = sum(
        _pcgrad_two(_task_grad("a", x, y, scale=0.5), _task_grad("b", x, y, scale=0.5))
        for x, y in batches
    )
    assert not torch.allclose(_flat(_shared(model)), separate), "per micro-batch would differ"
    plain = _model()
    for x, targets in batches:
        (sum(_losses(plain, x, targets).values()) / 2).backward()
    for name, p in plain.heads.named_parameters():
        torch.testing.assert_close(model.heads.get_parameter(name).grad, p.grad, msg=name)


def test_pcgrad_adds_the_joint_terms_and_follows_the_loss_scale() -> None:
    x, targets = _data()
    model = _model()
    weighting = build_weighting("pcgrad", TASKS)
    bundle = _rich_bundle(model, x, targets)
    weighting.backward(bundle, _shared(model), FakeAccelerator(scale=8.0))

    ref = _model()
    ref_bundle = _rich_bundle(ref, x, targets)
    shared = _shared(ref)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
        for loss in [*ref_bundle.task_losses().values(), ref_bundle.joint_loss()]
    ]
    expected = 8.0 * (_pcgrad_two(rows[0], rows[1]) + rows[2])
    torch.testing.assert_close(_flat(_shared(model)), expected)
    (8.0 * ref_bundle.total()).backward()
    for name, p in ref.heads.named_parameters():
        torch.testing.assert_close(model.heads.get_parameter(name).grad, p.grad, msg=name)


def test_pcgrad_with_a_task_absent_from_the_batch() -> None:
    x, targets = _data()
    model = _model()
    weighting = build_weighting("pcgrad", TASKS)
    logs = weighting.backward(
        _bundle(model, x, {"a": targets["a"]}), _shared(model), FakeAccelerator()
    )
    torch.testing.assert_close(_flat(_shared(model)), _task_grad("a", x, targets))
    assert logs["gradcos/a~b"] == 0.0
    assert model.heads.b.weight.grad is None


def test_pcgrad_three_tasks_is_seeded_and_leaves_the_global_rng_alone() -> None:
    tasks = ["a", "b", "c"]
    x, targets = _data(tasks=tasks)
    jacobian = torch.stack([_task_grad(t, x, targets) for t in tasks])
    results = []
    for _ in range(2):
        model = _model(tasks)
        weighting = build_weighting("pcgrad", tasks, seed=3)
        torch.manual_seed(123)
        state = torch.get_rng_state()
        logs = weighting.backward(_bundle(model, x, targets), _shared(model), FakeAccelerator())
        assert torch.equal(torch.get_rng_state(), state)
        results.append(_flat(_shared(model)))
        assert set(logs) == {
            "weight/a", "weight/b", "weight/c", "gradcos/a~b", "gradcos/a~c", "gradcos/b~c"
        }  # fmt: skip
        assert logs["gradcos/b~c"] == pytest.approx(_cos(jacobian[1], jacobian[2]), abs=1e-6)
    assert torch.equal(results[0], results[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # the orders of the first call are drawn with seed + 0
        torch.testing.assert_close(results[0], TorchJDPCGrad()(jacobian))


def test_pcgrad_rejects_unknown_tasks() -> None:
    x, targets = _data(tasks=["a", "z"])
    model = _model(["a", "z"])
    with pytest.raises(KeyError, match="'z'"):
        build_weighting("pcgrad", TASKS).backward(
            _bundle(model, x, targets), _shared(model), FakeAccelerator()
        )


def test_pcgrad_with_a_real_accelerator() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 1
    x, targets = _data()
    model = _model()
    model.weighting = build_weighting("pcgrad", TASKS)
    assert isinstance(model.weighting, GradientWeighting)
    prepared = accelerator.prepare(model)
    inner = accelerator.unwrap_model(prepared)
    bundle = LossBundle(supervised={t: ((out - targets[t]) ** 2).mean() for t, out in prepared(
        x).items()})  # fmt: skip
    logs = inner.weighting.backward(bundle, _shared(inner), accelerator)
    g_a, g_b = _task_grad("a", x, targets), _task_grad("b", x, targets)
    torch.testing.assert_close(_flat(_shared(inner)), _pcgrad_two(g_a, g_b))
    assert logs["gradcos/a~b"] == pytest.approx(_cos(g_a, g_b), abs=1e-6)
    plain = _model()
    sum(_losses(plain, x, targets).values()).backward()
    for name, p in plain.heads.named_parameters():
        torch.testing.assert_close(inner.heads.get_parameter(name).grad, p.grad, msg=name)
