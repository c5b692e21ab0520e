"""Uncertainty of differences: per-image sums against the meters, the paired bootstrap against
hand-computed references, McNemar's test against exact binomial sums, the t interval."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pytest
import torch

import unirep.metrics.uncertainty as uncertainty
from tests.conftest import random_dense_batch
from unirep.metrics.classification import AccuracyMeter, delta_m
from unirep.metrics.dense import DepthMeter, NormalMeter, SegmentationMeter
from unirep.metrics.uncertainty import (
    PairedTask,
    compare,
    image_sums,
    interval,
    mcnemar_chi2,
    mcnemar_exact,
    mean_interval,
    paired_bootstrap,
    per_image_record,
    split_value,
    t_quantile,
    verdict,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _record(correct: Any, start: int = 0, labelled: Any = None) -> dict[str, Any]:
    """A classification task's per-image record: ``correct`` per image (1/0), all labelled."""
    correct = np.asarray(correct, dtype=int)
    labelled = np.ones_like(correct) if labelled is None else np.asarray(labelled, dtype=int)
    ids = torch.arange(start, start + len(correct))
    return per_image_record("accuracy", ids, torch.from_numpy(np.stack([correct, labelled], 1)))


def _coin(n: int, p: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(int)


# --------------------------------------------------------------------------------------------
# Per-image sums reproduce the whole-split meters
# --------------------------------------------------------------------------------------------


def test_accuracy_sums_match_the_meter() -> None:
    logits = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, -1] * 4)
    meter = AccuracyMeter()
    meter.update(logits, labels)
    sums = image_sums("accuracy", logits.argmax(1), labels)
    assert sums.shape == (20, 2) and sums.dtype == torch.int64
    assert sums[:, 1].sum() == 16  # the unlabelled images count nowhere
    assert split_value("accuracy", sums.sum(0).numpy()) == pytest.approx(meter.compute())


def test_dense_sums_match_the_meters() -> None:
    preds, targets, _ = random_dense_batch(3, 6, 7, seed=1)
    seg, depth, normal = SegmentationMeter(4), DepthMeter(), NormalMeter()
    seg.update(preds["seg"], targets["seg"])
    depth.update(preds["depth"], targets["depth"])
    normal.update(preds["normal"], targets["normal"])
    s = image_sums("miou", preds["seg"].argmax(1), targets["seg"], num_classes=4)
    assert s.shape == (3, 12)  # per class: true positives, target pixels, predicted pixels
    assert split_value("miou", s.sum(0).numpy()) == pytest.approx(seg.compute()["miou"])
    d = image_sums("abs_err", preds["depth"], targets["depth"])
    assert split_value("abs_err", d.sum(0).numpy()) == pytest.approx(depth.compute()["abs_err"])
    a = image_sums("angle_mean", preds["normal"], targets["normal"])
    expected = normal.compute()["angle_mean"]
    assert split_value("angle_mean", a.sum(0).numpy()) == pytest.approx(expected, rel=1e-6)
    # a metric without a decomposition has none; mIoU needs its classes
    assert image_sums("rel_err", preds["depth"], targets["depth"]) is None
    with pytest.raises(ValueError, match="classes"):
        image_sums("miou", preds["seg"], targets["seg"])


def test_miou_of_summed_images_is_not_a_mean_of_image_mious() -> None:
    # image 0: class 0 right on 1 pixel; image 1: class 1 predicted as 0 on 3 pixels
    pred = torch.tensor([[[0]], [[0]]]).expand(2, 1, 3).clone()
    target = torch.tensor([[[0, -1, -1]], [[1, 1, 1]]])
    sums = image_sums("miou", pred, target, num_classes=2).numpy()
    # whole split: class 0 IoU = 1 / (1 + 3) (3 false positives), class 1 IoU = 0
    assert split_value("miou", sums.sum(0)) == pytest.approx((0.25 + 0.0) / 2)
    # resampled sums (any leading shape) are scored the same way; nothing valid is NaN
    twice = np.stack([sums[0] * 2, sums.sum(0)])
    assert split_value("miou", twice).tolist() == pytest.approx([1.0, 0.125])
    assert math.isnan(split_value("accuracy", np.zeros(2)))


# --------------------------------------------------------------------------------------------
# Paired bootstrap
# --------------------------------------------------------------------------------------------


def test_identical_models_give_a_zero_interval() -> None:
    same = _coin(300, 0.8, seed=0)
    found = compare({"a": _record(same)}, {"a": _record(same)}, {"a": "a"}, "mean_accuracy")
    assert found is not None
    assert found["difference"] == 0.0 and found["ci95"] == [0.0, 0.0]
    assert found["verdict"] == "no clear difference"
    assert found["per_task"]["a"]["mcnemar_p"] == 1.0


def test_a_tie_contains_zero_and_a_clear_win_excludes_it() -> None:
    n = 2000
    tie_a, tie_b = _coin(n, 0.8563, seed=1), _coin(n, 0.8556, seed=2)
    tie = compare({"d": _record(tie_a)}, {"d": _record(tie_b)}, {"d": "d"}, "mean_accuracy")
    assert tie is not None
    lo, hi = tie["ci95"]
    assert lo < 0.0 < hi and tie["verdict"] == "no clear difference"
    assert tie["unit"] == "percentage points" and tie["quantity"] == "mean accuracy"
    assert tie["difference"] == pytest.approx(100 * (tie_a.mean() - tie_b.mean()))
    win_a, win_b = _coin(n, 0.95, seed=3), _coin(n, 0.60, seed=4)
    win = compare({"d": _record(win_a)}, {"d": _record(win_b)}, {"d": "d"}, "mean_accuracy")
    assert win is not None and win["ci95"][0] > 0 and win["verdict"] == "clearly better"
    assert win["per_task"]["d"]["mcnemar_p"] < 1e-6
    loss = compare({"d": _record(win_b)}, {"d": _record(win_a)}, {"d": "d"}, "mean_accuracy")
    assert loss is not None and loss["ci95"][1] < 0 and loss["verdict"] == "clearly worse"


def test_the_interval_matches_the_normal_approximation() -> None:
    """Hand reference: the bootstrap of a mean of paired differences d_i has standard deviation
    sd(d) / √n, so the 95 % interval is about ±1.96 sd(d) / √n around the difference."""
    n = 1500
    a, b = _coin(n, 0.7, seed=5), _coin(n, 0.6, seed=6)
    found = compare({"x": _record(a)}, {"x": _record(b)}, {"x": "x"}, "mean_accuracy")
    assert found is not None
    d = 100.0 * (a - b)
    half = 1.96 * d.std() / math.sqrt(n)
    lo, hi = found["ci95"]
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(d.mean(), abs=0.1 * half)


def test_the_bootstrap_is_deterministic_with_its_seed() -> None:
    a, b = {"x": _record(_coin(400, 0.7, 7))}, {"x": _record(_coin(400, 0.68, 8))}
    first = compare(a, b, {"x": "x"}, "mean_accuracy")
    assert first == compare(a, b, {"x": "x"}, "mean_accuracy")
    other = compare(a, b, {"x": "x"}, "mean_accuracy", seed=1)
    assert other is not None and first is not None
    assert other["ci95"] != first["ci95"] and other["difference"] == first["difference"]
    assert first["seed"] == 0 and first["resamples"] == 1000


def test_few_distinct_images_draw_as_images_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """The multinomial over distinct rows and drawing n image indices are one distribution."""
    rows = np.stack([_coin(800, 0.7, 9), np.ones(800, dtype=int)], 1).astype(float)
    task = {"x": PairedTask("accuracy", "s", rows, rows[::-1].copy())}
    grouped = paired_bootstrap(task, resamples=4000)["x"][0][1:]
    monkeypatch.setattr(uncertainty, "_FEW_ROWS", 0)  # force the index draws
    drawn = paired_bootstrap(task, resamples=4000)["x"][0][1:]
    assert grouped.mean() == pytest.approx(drawn.mean(), abs=0.002)
    assert grouped.std() == pytest.approx(drawn.std(), rel=0.1)
    assert grouped.std() == pytest.approx(math.sqrt(0.7 * 0.3 / 800), rel=0.15)


def test_images_are_paired_by_id_and_strata_keep_their_size() -> None:
    a, b = _coin(300, 0.8, 10), _coin(300, 0.7, 11)
    c, d = _coin(50, 0.5, 12), _coin(50, 0.9, 13)
    streams = {"big": "big", "small": "small"}
    mine = {"big": _record(a), "small": _record(c, start=1000)}
    theirs = {"big": _record(b), "small": _record(d, start=1000)}
    found = compare(mine, theirs, streams, "mean_accuracy")
    # the other model's records in another order: the same images, the same answer
    order = np.random.default_rng(0).permutation(300)
    shuffled = dict(theirs)
    shuffled["big"] = {
        "metric": "accuracy",
        "ids": [theirs["big"]["ids"][i] for i in order],
        "sums": [theirs["big"]["sums"][i] for i in order],
    }
    assert compare(mine, shuffled, streams, "mean_accuracy") == found
    assert found is not None and found["images"] == 350
    # the headline is the mean over domains, whatever their sizes
    expected = 100 * ((a.mean() - b.mean()) + (c.mean() - d.mean())) / 2
    assert found["difference"] == pytest.approx(expected)
    assert set(found["per_task"]) == {"big", "small"}
    assert found["per_task"]["small"]["images"] == 50
    # no ids (-1): matched by position; a task without a record: no comparison
    anonymous = {k: {**r, "ids": [-1] * len(r["ids"])} for k, r in mine.items()}
    assert compare(anonymous, theirs, streams, "mean_accuracy") == found
    assert compare({"big": mine["big"]}, theirs, streams, "mean_accuracy") is None
    empty = {**mine, "small": {"metric": "accuracy", "ids": [], "sums": []}}
    assert compare(empty, theirs, streams, "mean_accuracy") is None
    # an unlabelled split: nothing to compare
    blank = {k: {**r, "sums": [[0, 0]] * len(r["ids"])} for k, r in mine.items()}
    assert compare(blank, blank, streams, "mean_accuracy") is None


def test_mcnemar_counts_only_labelled_images() -> None:
    a = [1, 1, 1, 0, 0, 1]
    b = [0, 0, 1, 1, 0, 0]
    labelled = [1, 1, 1, 1, 1, 0]
    found = compare(
        {"x": _record(a, labelled=labelled)},
        {"x": _record(b, labelled=labelled)},
        {"x": "x"},
        "mean_accuracy",
    )
    assert found is not None
    assert found["per_task"]["x"]["discordant"] == [2, 1]
    assert found["per_task"]["x"]["mcnemar_p"] == pytest.approx(1.0)


def test_delta_m_of_dense_tasks_sharing_their_images() -> None:
    rng = np.random.default_rng(14)
    n, k = 40, 3

    def records(shift: float) -> dict[str, Any]:
        seg = rng.integers(0, 50, size=(n, 3 * k))
        seg[:, :k] = np.minimum(seg[:, :k], seg[:, k : 2 * k])  # TP ≤ target pixels
        err = np.stack([rng.random(n) * 10 + shift, np.full(n, 10.0)], 1)
        ids = torch.arange(n)
        return {
            "seg": per_image_record("miou", ids, torch.from_numpy(seg)),
            "dep": per_image_record("abs_err", ids, torch.from_numpy(err)),
        }

    a, b = records(0.0), records(5.0)
    found = compare(a, b, {"seg": "img", "dep": "img"}, "delta_m")
    assert found is not None and found["unit"] == "%" and found["quantity"] == "Δm"
    value = {
        r: {
            t: {m["metric"]: float(split_value(m["metric"], np.asarray(m["sums"]).sum(0)))}
            for t, m in recs.items()
        }
        for r, recs in (("a", a), ("b", b))
    }
    assert found["difference"] == pytest.approx(delta_m(value["a"], value["b"]))
    assert found["images"] == n  # one stream: the tasks are resampled together
    assert found["per_task"]["dep"]["unit"] == "units of the target"
    assert "mcnemar_p" not in found["per_task"]["dep"]
    # a lower error is better: the per-task verdict follows the metric's direction
    assert found["per_task"]["dep"]["verdict"] == "clearly better"
    assert compare(a, b, {"seg": "img", "dep": "img"}, "mean_accuracy") is None


def test_ten_thousand_images_in_well_under_a_second() -> None:
    domains = {f"d{i}": f"d{i}" for i in range(10)}
    mine = {d: _record(_coin(1000, 0.86, i), start=1000 * i) for i, d in enumerate(domains)}
    theirs = {d: _record(_coin(1000, 0.85, 20 + i), start=1000 * i) for i, d in enumerate(domains)}
    start = time.perf_counter()
    found = compare(mine, theirs, domains, "mean_accuracy")
    assert time.perf_counter() - start < 1.0
    assert found is not None and found["images"] == 10_000


# --------------------------------------------------------------------------------------------
# Intervals, verdicts, McNemar, seeds
# --------------------------------------------------------------------------------------------


def test_interval_and_verdict() -> None:
    assert interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    assert interval([np.nan, np.inf]) is None
    assert verdict((-0.9, 1.0)) == "no clear difference"
    assert verdict((0.0, 1.0)) == "no clear difference"  # 0 is in the interval
    assert verdict((0.1, 1.0)) == "clearly better"
    assert verdict((-1.0, -0.1)) == "clearly worse"
    assert verdict((0.1, 1.0), higher_is_better=False) == "clearly worse"  # an error grew


def test_mcnemar_exact_against_binomial_sums() -> None:
    # 1 and 9 discordant images: p = 2 (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024, rel=1e-12)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    b, c = 30, 55
    exact = 2 * sum(math.comb(b + c, i) for i in range(b + 1)) / 2 ** (b + c)
    assert mcnemar_exact(b, c) == pytest.approx(exact, rel=1e-9)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_mcnemar_chi2_by_hand_and_near_the_exact_test() -> None:
    # (|10 − 30| − 1)² / 40 = 9.025; P(χ²₁ > 9.025) = erfc(√(9.025 / 2)) ≈ 0.002663
    assert mcnemar_chi2(10, 30) == pytest.approx(0.0026631, rel=1e-4)
    assert mcnemar_chi2(0, 0) == 1.0 and mcnemar_chi2(7, 7) == 1.0
    assert mcnemar_chi2(400, 470) == pytest.approx(mcnemar_exact(400, 470), rel=0.05)


def test_t_interval_over_seeds() -> None:
    assert t_quantile(2) == 4.303 and t_quantile(30) == 2.042
    assert t_quantile(1000) == pytest.approx(1.9623, abs=1e-3)
    found = mean_interval([1.0, 2.0, 3.0])
    assert found is not None and found["mean"] == 2.0 and found["std"] == 1.0
    half = 4.303 / math.sqrt(3)
    assert found["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert mean_interval([0.5]) == {"mean": 0.5, "std": None, "ci95": None, "runs": 1}
    assert mean_interval([]) is None
