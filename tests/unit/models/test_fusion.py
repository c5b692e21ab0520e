"""Progressive decoder fusion (unirep.models.fusion): debiased CKA, the grouping rule against a
port of the reference's enumeration, and the fused network."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from unirep.models.build import build_dense, count_parameters
from unirep.models.fusion import (
    ProgressiveDecoderNet,
    group_tasks,
    group_within,
    linear_cka_debiased,
    similarity_matrix,
)

TASKS = {"semantic": 4, "depth": 1, "normal": 3}
ARCH = {"encoder": "segnet", "encoder_kwargs": {"width_mult": 0.0625}, "decoder_channels": 6}


# --------------------------------------------------------------------------------------------
# CKA


def _gram_cka_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA from Gram matrices with the unbiased HSIC estimator (Song et al. 2012), computed the
    long way: a check of the feature-space formula."""
    x, y = x.double(), y.double()
    n = x.shape[0]

    def centred(k: torch.Tensor) -> torch.Tensor:
        k = k.clone()
        k.fill_diagonal_(0)
        means = k.sum(0) / (n - 2)
        means = means - means.sum() / (2 * (n - 1))
        k = k - means[:, None] - means[None, :]
        k.fill_diagonal_(0)
        return k

    kx, ky = centred(x @ x.T), centred(y @ y.T)
    return float((kx * ky).sum() / (kx.norm() * ky.norm()))


def test_debiased_cka_matches_the_gram_form_and_its_invariances() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=g)
    y = x @ torch.randn(12, 7, generator=g) + 0.5 * torch.randn(40, 7, generator=g)
    value = float(linear_cka_debiased(x, y))
    assert value == pytest.approx(_gram_cka_unbiased(x, y), abs=1e-10)
    assert float(linear_cka_debiased(x, x)) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    assert float(linear_cka_debiased(3.0 * x.double() @ q + 2.0, y)) == pytest.approx(value)
    noise = torch.randn(40, 7, generator=g)
    assert abs(float(linear_cka_debiased(x, noise))) < value
    assert float(linear_cka_debiased(torch.ones(8, 3), x[:8])) == 0.0  # nothing to compare
    with pytest.raises(ValueError, match="n >= 4"):
        linear_cka_debiased(x[:3], y[:3])


# --------------------------------------------------------------------------------------------
# Grouping against the reference's enumeration


def _reference_grouping(tasks: list[str], sim: dict[str, dict[str, float]], threshold: float):
    """A port of ``GroupTasks.create_selection`` (NeurAI-Lab/ProgressiveDecoderFusion,
    utilities/generic_utils.py): every subset with each member's mean similarity to the others
    (0 alone), then for split = 0, 1, ... the best-scoring cover by at most ``split`` disjoint
    subsets, stopping at the first that reaches the threshold."""
    subsets: list[tuple[str, dict[str, float]]] = []
    for size in range(1, len(tasks) + 1):
        for combo in itertools.combinations(tasks, size):
            if size == 1:
                scores = {combo[0]: 0.0}
            else:
                scores = {t: sum(sim[t][u] for u in combo if u != t) / (size - 1) for t in combo}
            subsets.append(("|".join(combo), scores))

    def best_cover(splits: int) -> tuple[float, list[str]]:
        best = (-1e9, [])
        for k in range(1, splits + 1):
            for chosen in itertools.combinations(subsets, k):
                names = [t for key, _ in chosen for t in key.split("|")]
                if sorted(names) != sorted(tasks):
                    continue
                per_task = {t: s for _, scores in chosen for t, s in scores.items()}
                avg = sum(per_task.values()) / len(per_task)
                if avg > best[0] + 1e-12:
                    best = (avg, [key for key, _ in chosen])
        return best

    unique: list[str] = []
    for split in range(len(tasks)):
        value, groups = best_cover(split)
        if groups:
            unique = groups
        if value >= threshold:
            break
    return sorted(sorted(g.split("|"), key=tasks.index) for g in unique)


def _random_sim(tasks: list[str], seed: int) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    sim = {a: {b: 1.0 for b in tasks} for a in tasks}
    for a, b in itertools.combinations(tasks, 2):
        sim[a][b] = sim[b][a] = float(torch.rand((), generator=g))
    return sim


@pytest.mark.parametrize("num_tasks", [2, 3, 4, 5])
@pytest.mark.parametrize("threshold", [0.2, 0.4, 0.6, 0.95])
def test_grouping_equals_the_references_enumeration(num_tasks: int, threshold: float) -> None:
    tasks = [f"t{i}" for i in range(num_tasks)]
    for seed in range(6):
        sim = _random_sim(tasks, 100 * num_tasks + seed)
        ours, _ = group_tasks(sim, threshold)
        assert sorted(ours) == _reference_grouping(tasks, sim, threshold), (sim, threshold)


def test_grouping_on_hand_made_features() -> None:
    """Two tasks whose pooled features are linear maps of one another and a third unrelated one:
    the pair is grouped, the third alone; with a threshold nothing reaches, the reference's
    fallback still fuses the closest pair, ``separate`` keeps all apart."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 8, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    features = {  # CKA is invariant to rotations and isotropic scaling
        "semantic": 2.0 * base,
        "depth": torch.randn(64, 8, generator=g),
        "normal": base @ rotation + 0.05 * torch.randn(64, 8, generator=g),
    }
    sim = similarity_matrix(features)
    assert sim["semantic"]["normal"] > 0.9 > 0.3 > abs(sim["semantic"]["depth"])
    groups, cleared = group_tasks(sim, 0.6)  # the pair scores 2/3 of its CKA
    assert groups == [["semantic", "normal"], ["depth"]] and cleared
    groups, cleared = group_tasks(sim, 0.95)  # the pair's partition: the best of at most 2
    assert groups == [["semantic", "normal"], ["depth"]] and not cleared
    assert group_tasks(sim, 0.95, "separate") == ([["semantic"], ["depth"], ["normal"]], False)
    # inside the previous block's groups only
    within, _ = group_within([["semantic"], ["depth", "normal"]], sim, 0.0)
    assert within == [["semantic"], ["depth", "normal"]]


# --------------------------------------------------------------------------------------------
# The network


def _pdf(fusion: list[Any] | None = None, **kwargs: Any) -> ProgressiveDecoderNet:
    torch.manual_seed(0)
    arch = {**ARCH, "sharing": "pdf", "sharing_kwargs": {"fusion": fusion or [], **kwargs}}
    net = build_dense(arch, TASKS, ["normal"])
    assert isinstance(net, ProgressiveDecoderNet)
    return net


def test_separate_blocks_compute_what_the_shared_encoder_student_computes() -> None:
    torch.manual_seed(0)
    plain = build_dense(ARCH, TASKS, ["normal"]).eval()
    pdf = _pdf().eval()
    assert count_parameters(plain) == count_parameters(pdf)
    stages = len(plain.encoder.channels)
    state = {}
    for key, value in plain.state_dict().items():
        if key.startswith("decoders."):
            _, task, part, *rest = key.split(".")
            if part == "laterals":
                index, rest = int(rest[0]), rest[1:]
                key = ".".join(["blocks", str(stages - 1 - index), task, *rest])
            else:  # fuse
                key = ".".join(["blocks", str(stages), task, *rest])
        state[key] = value
    pdf.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = plain(x), pdf(x)
    for task in TASKS:
        for key in ("pred", "features", "bottleneck"):
            assert torch.allclose(a[task][key], b[task][key], atol=1e-6), (task, key)


def test_a_fused_block_is_one_computation_for_its_group() -> None:
    fusion = [[["semantic", "normal"], ["depth"]], [["semantic", "normal"], ["depth"]]]
    fused, separate = _pdf(fusion).eval(), _pdf().eval()
    assert set(fused.blocks[0]) == {"semantic+normal", "depth"}
    assert count_parameters(fused) < count_parameters(separate)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        after = fused.block_features(x, 1)
        assert torch.equal(after["semantic"], after["normal"])
        assert not torch.equal(fused.block_features(x, 2)["semantic"],
                               fused.block_features(x, 2)["normal"])  # fmt: skip
    assert fused.next_block() == 2
    assert _pdf(fusion, max_blocks=2).next_block() is None
    assert _pdf([[["semantic"], ["depth"], ["normal"]]]).next_block() is None


@pytest.mark.parametrize(
    ("fusion", "message"),
    [
        ([[["semantic", "normal"]]], "every task"),
        ([[["semantic"], ["depth", "normal"]], [["semantic", "depth"], ["normal"]]], "not one"),
    ],
)
def test_a_fusion_that_cannot_be_computed_is_refused(fusion: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _pdf(fusion)
