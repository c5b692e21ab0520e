"""Metrics against hand-computed values and the published Visual Decathlon table."""

from __future__ import annotations

import math

import pytest
import torch

from unirep.metrics.classification import (
    FINETUNE_ACCURACY,
    METRIC_HIGHER_IS_BETTER,
    OFFICIAL_DECATHLON_DOMAINS,
    PUBLISHED_ACCURACY,
    PUBLISHED_SCORE,
    AccuracyMeter,
    decathlon_score,
    delta_m,
)

# --------------------------------------------------------------------------------------------
# AccuracyMeter
# --------------------------------------------------------------------------------------------


def test_accuracy_from_logits() -> None:
    meter = AccuracyMeter()
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.1, 0.2, 0.9], [5.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])  # argmax = [0, 1, 2, 0] -> 2 of 4 correct
    meter.update(logits, labels)
    assert meter.count == 4
    assert meter.correct == 2
    assert meter.compute() == pytest.approx(0.5)


def test_accuracy_from_predictions_ignores_negative_labels() -> None:
    meter = AccuracyMeter()
    preds = torch.tensor([3, 1, 4, 1, 5])
    labels = torch.tensor([3, -1, 4, 0, -1])  # labelled: 3 (ok), 4 (ok), 0 (wrong)
    meter.update(preds, labels)
    assert meter.count == 3
    assert meter.compute() == pytest.approx(2 / 3)


def test_accuracy_accumulates_over_updates_not_batch_mean() -> None:
    meter = AccuracyMeter()
    meter.update(torch.tensor([0]), torch.tensor([0]))  # 1/1
    meter.update(torch.tensor([0, 0, 0]), torch.tensor([1, 1, 0]))  # 1/3
    meter.update(torch.tensor([2, 2]), torch.tensor([-1, -1]))  # nothing labelled
    # accumulated 2/4 = 0.5, whereas the mean of batch accuracies would be 2/3
    assert meter.count == 4
    assert meter.compute() == pytest.approx(0.5)
    meter.reset()
    assert meter.count == 0


def test_accuracy_without_samples_raises() -> None:
    meter = AccuracyMeter()
    with pytest.raises(ValueError, match="no labelled samples"):
        meter.compute()
    meter.update(torch.tensor([1, 2]), torch.tensor([-1, -1]))
    with pytest.raises(ValueError):
        meter.compute()


@pytest.mark.parametrize(
    ("preds", "labels"),
    [
        (torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long)),  # 3-D scores
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1])),  # float 1-D predictions
        (torch.tensor([0, 1, 2]), torch.tensor([0, 1])),  # batch size mismatch
        (torch.tensor([0, 1]), torch.tensor([[0, 1]])),  # labels not [B]
    ],
)
def test_accuracy_rejects_bad_shapes(preds: torch.Tensor, labels: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        AccuracyMeter().update(preds, labels)


# --------------------------------------------------------------------------------------------
# Decathlon score
# --------------------------------------------------------------------------------------------


def _fractions(percent: dict[str, float]) -> dict[str, float]:
    return {domain: value / 100.0 for domain, value in percent.items()}


def test_published_tables_cover_the_official_domains() -> None:
    assert len(OFFICIAL_DECATHLON_DOMAINS) == 10
    assert set(FINETUNE_ACCURACY) == set(OFFICIAL_DECATHLON_DOMAINS)
    for row in PUBLISHED_ACCURACY.values():
        assert set(row) == set(OFFICIAL_DECATHLON_DOMAINS)
    assert set(PUBLISHED_SCORE) == set(PUBLISHED_ACCURACY)
    assert FINETUNE_ACCURACY["imagenet12"] == 59.87
    assert FINETUNE_ACCURACY["ucf101"] == 51.20


@pytest.mark.parametrize("method", sorted(PUBLISHED_SCORE))
def test_decathlon_score_reproduces_published_table(method: str) -> None:
    total, per_domain = decathlon_score(
        _fractions(PUBLISHED_ACCURACY[method]), _fractions(FINETUNE_ACCURACY)
    )
    assert set(per_domain) == set(OFFICIAL_DECATHLON_DOMAINS)
    assert abs(total - PUBLISHED_SCORE[method]) <= 1.0


def test_matching_the_reference_scores_250_per_domain() -> None:
    total, per_domain = decathlon_score(
        _fractions(FINETUNE_ACCURACY), _fractions(FINETUNE_ACCURACY)
    )
    assert all(score == pytest.approx(250.0) for score in per_domain.values())
    assert total == pytest.approx(2500.0)


def test_decathlon_score_toy_by_hand() -> None:
    reference = {"a": 0.8, "b": 0.5, "c": 0.9}
    accuracy = {"a": 0.9, "b": 0.0, "c": 1.0}
    # a: E_max = 0.4, E = 0.1 -> 1000 / 0.16 * 0.3^2 = 562.5
    # b: E_max = 1.0, E = 1.0 -> 0
    # c: E_max = 0.2, E = 0.0 -> 1000 (perfect)
    total, per_domain = decathlon_score(accuracy, reference)
    assert per_domain["a"] == pytest.approx(562.5)
    assert per_domain["b"] == pytest.approx(0.0)
    assert per_domain["c"] == pytest.approx(1000.0)
    assert total == pytest.approx(1562.5)


def test_decathlon_score_is_clipped_at_zero_and_uses_gamma() -> None:
    # worse than twice the reference error -> 0, never negative
    total, _ = decathlon_score({"a": 0.1}, {"a": 0.6})
    assert total == 0.0
    # gamma = 1, matching the reference: E_max = 0.4, E = 0.2 -> 1000 / 0.4 * 0.2 = 500
    total, _ = decathlon_score({"a": 0.8}, {"a": 0.8}, gamma=1.0)
    assert total == pytest.approx(500.0)


def test_decathlon_score_with_perfect_reference() -> None:
    assert decathlon_score({"a": 1.0}, {"a": 1.0})[0] == 1000.0
    assert decathlon_score({"a": 0.99}, {"a": 1.0})[0] == 0.0


def test_decathlon_score_missing_reference_domain_names_it() -> None:
    with pytest.raises(KeyError, match="svhn"):
        decathlon_score({"svhn": 0.9}, {"dtd": 0.5})


def test_decathlon_score_rejects_percentages() -> None:
    with pytest.raises(ValueError, match="fraction"):
        decathlon_score({"svhn": 96.5}, {"svhn": 0.9655})


# --------------------------------------------------------------------------------------------
# Δm
# --------------------------------------------------------------------------------------------


def test_delta_m_mixed_directions_by_hand() -> None:
    reference = {
        "segmentation": {"miou": 0.40, "pixel_acc": 0.50},
        "depth": {"abs_err": 0.60},
        "normal": {"angle_mean": 25.0},
    }
    results = {
        "segmentation": {"miou": 0.44, "pixel_acc": 0.45},  # +10 %, -10 %
        "depth": {"abs_err": 0.45},  # lower is better: +25 %
        "normal": {"angle_mean": 30.0},  # lower is better: -20 %
    }
    assert delta_m(results, reference) == pytest.approx((10 - 10 + 25 - 20) / 4)


def test_delta_m_only_common_pairs_and_zero_for_identical() -> None:
    reference = {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.8}}
    results = {"a": {"accuracy": 0.6, "extra": 1.0}, "c": {"accuracy": 0.1}}
    # only a/accuracy is shared (extra has no reference, c has no reference task)
    assert delta_m(results, reference) == pytest.approx(20.0)
    assert delta_m(reference, reference) == 0.0


def test_delta_m_unknown_metric_names_it() -> None:
    with pytest.raises(ValueError, match="rmse"):
        delta_m({"depth": {"rmse": 0.5}}, {"depth": {"rmse": 0.6}})
    # ...unless its direction is given
    value = delta_m({"depth": {"rmse": 0.5}}, {"depth": {"rmse": 0.625}}, {"rmse": False})
    assert value == pytest.approx(20.0)


def test_delta_m_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="0"):
        delta_m({"a": {"accuracy": 0.5}}, {"a": {"accuracy": 0.0}})
    with pytest.raises(ValueError, match="share no"):
        delta_m({"a": {"accuracy": 0.5}}, {"b": {"accuracy": 0.5}})
    with pytest.raises(ValueError, match="non-finite"):
        delta_m({"a": {"accuracy": math.nan}}, {"a": {"accuracy": 0.5}})


def test_standard_metric_directions() -> None:
    assert all(METRIC_HIGHER_IS_BETTER[m] for m in ("accuracy", "miou", "within_11.25"))
    assert not any(METRIC_HIGHER_IS_BETTER[m] for m in ("abs_err", "rel_err", "angle_median"))


def test_official_score_uses_the_finetune_reference() -> None:
    from unirep.metrics.classification import official_decathlon_score

    url = {d: a / 100 for d, a in PUBLISHED_ACCURACY["URL"].items()}
    assert official_decathlon_score(url) == pytest.approx(3626, abs=1)
    assert official_decathlon_score({"aircraft": url["aircraft"]}) == pytest.approx(
        decathlon_score({"aircraft": url["aircraft"]}, {"aircraft": 0.6034})[0]
    )
    assert official_decathlon_score({"digits": 0.5}) is None
    assert official_decathlon_score({"aircraft": None}) is None
