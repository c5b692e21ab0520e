"""``go4align`` against a port of the authors' ``GO4ALIGN.get_weighted_loss``
(``autumn9999/GO4Align`` methods/cluster_methods.py) over several SGD steps (values, weights and
every gradient), its exact 1-D K-means against brute force, absent tasks, resume, refusals."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from tests.unit.weighting import tracking
from tests.unit.weighting.test_weighting import FakeAccelerator
from unirep.errors import ConfigError
from unirep.losses.bundle import LossBundle
from unirep.pipeline.validate import load_config
from unirep.weighting import build_weighting
from unirep.weighting.go4align import kmeans_1d

TASKS = ["a", "b", "c", "d"]


def brute_kmeans(values: list[float], groups: int) -> list[float]:
    """The optimal K-means clustering by enumerating every assignment (what Lloyd's algorithm,
    the reference's, converges to when it finds the optimum)."""
    best, centres = float("inf"), values
    for labels in itertools.product(range(groups), repeat=len(values)):
        if len(set(labels)) != groups:
            continue
        pairs = list(zip(values, labels, strict=True))
        means = {g: sum(v for v, lab in pairs if lab == g) / labels.count(g) for g in set(labels)}
        cost = sum((v - means[lab]) ** 2 for v, lab in zip(values, labels, strict=True))
        if cost < best - 1e-12:
            best, centres = cost, [means[lab] for lab in labels]
    return centres


class ReferenceGO4Align:
    """``GO4ALIGN.__init__`` / ``get_weighted_loss``, the clustering by :func:`brute_kmeans`."""

    def __init__(self, n_tasks: int, num_groups: int, robust_step_size: float = 1e-4) -> None:
        self.n_tasks, self.num_groups = n_tasks, num_groups
        self.adv_probs = torch.ones(n_tasks, dtype=torch.float64) / n_tasks
        self.robust_step_size = robust_step_size

    def get_weighted_loss(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        adjusted_loss = losses.detach()
        scale = adjusted_loss.sum() / adjusted_loss
        self.adv_probs = self.adv_probs * torch.exp(-self.robust_step_size * adjusted_loss)
        self.adv_probs = self.adv_probs / (self.adv_probs.sum())
        weight = scale * self.adv_probs
        if self.num_groups >= 2:
            kmeans_weight = torch.tensor(
                brute_kmeans(weight.tolist(), self.num_groups), dtype=weight.dtype
            )
        else:
            kmeans_weight = torch.ones(self.n_tasks, dtype=weight.dtype) * torch.mean(weight)
        return torch.sum(losses * kmeans_weight), kmeans_weight


@pytest.mark.parametrize(
    "kwargs", [{}, {"num_groups": 2}, {"num_groups": 3, "robust_step_size": 0.05}]
)
def test_go4align_matches_the_reference_over_several_steps(kwargs: dict) -> None:
    weighting = build_weighting("go4align", TASKS, **kwargs)
    reference = ReferenceGO4Align(
        len(TASKS), kwargs.get("num_groups", 1), kwargs.get("robust_step_size", 1e-4)
    )
    ours, theirs = tracking.model(TASKS), tracking.model(TASKS)
    for step in range(5):
        x, targets = tracking.batch(step, TASKS)
        value = weighting.combine(LossBundle(supervised=tracking.losses(ours, x, targets)))
        value.backward()
        task_losses = tracking.losses(theirs, x, targets)
        want, want_weights = reference.get_weighted_loss(torch.stack(list(task_losses.values())))
        want.backward()
        torch.testing.assert_close(value, want, rtol=1e-6, atol=0)
        weights = torch.tensor([weighting.weights()[t] for t in TASKS], dtype=torch.float64)
        torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=0)
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-12, msg=name)
        torch.testing.assert_close(weighting.probs, reference.adv_probs, rtol=1e-12, atol=0)
        tracking.sgd_(ours)
        tracking.sgd_(theirs)
    if kwargs.get("num_groups", 1) > 1:
        assert len(set(weighting.weights().values())) == kwargs["num_groups"]


@pytest.mark.parametrize("seed", range(20))
def test_kmeans_1d_is_the_optimal_clustering(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    values = (torch.rand(5, generator=gen) * 4).tolist()
    for groups in (1, 2, 3, 4, 5):
        got, want = kmeans_1d(values, groups), brute_kmeans(values, groups)
        cost = sum((v - c) ** 2 for v, c in zip(values, got, strict=True))
        best = sum((v - c) ** 2 for v, c in zip(values, want, strict=True))
        assert cost == pytest.approx(best, abs=1e-12)
        assert got == pytest.approx(want)


def test_go4align_absent_task_keeps_its_indicator() -> None:
    weighting = build_weighting("go4align", TASKS, num_groups=2, robust_step_size=0.1)
    net = tracking.model(TASKS)
    x, targets = tracking.batch(0, TASKS)
    task_losses = tracking.losses(net, x, targets)
    del task_losses["b"]
    before = weighting.probs.clone()
    weighting.combine(LossBundle(supervised=task_losses))
    assert weighting.weights()["b"] == 0.0
    assert weighting.probs[1] == before[1]
    assert float(weighting.probs.sum()) == pytest.approx(1.0)


def test_go4align_resumes_bit_exactly() -> None:
    tracking.check_resume("go4align", TASKS)


def test_go4align_refuses_a_non_positive_loss() -> None:
    weighting = build_weighting("go4align", TASKS)
    net = tracking.model(TASKS)
    x, targets = tracking.batch(0, TASKS)
    task_losses = tracking.losses(net, x, targets)
    task_losses["c"] = task_losses["c"] * 0
    with pytest.raises(ValueError, match="task 'c' has a loss"):
        weighting.backward(
            LossBundle(supervised=task_losses), tracking.shared(net), FakeAccelerator()
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [("{num_groups: 0}", "num_groups"), ("{num_groups: 9}", "num_groups"),
     ("{robust_step_size: x}", "robust_step_size")],
)  # fmt: skip
def test_go4align_refuses_bad_arguments_naming_the_key(kwargs: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"weighting\.kwargs.*{message}"):
        load_config("mini-scenes", [f"weighting={{name: go4align, kwargs: {kwargs}}}"])
