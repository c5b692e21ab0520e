"""Evaluation metrics and benchmark scores.

* :class:`AccuracyMeter` accumulates top-1 accuracy over a whole split (never an average of
  per-batch accuracies).
* :func:`decathlon_score` is the Visual Decathlon score (Rebuffi, Bilen & Vedaldi, NeurIPS 2017).
* :func:`delta_m` is the mean relative change against a reference (Maninis et al., CVPR 2019;
  Vandenhende et al., TPAMI 2021), used for "student vs teachers".

Conventions: accuracies are **fractions in [0, 1]** everywhere in code and in ``metrics.json``;
only the published tables below are kept in percent, as printed in the papers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "FINETUNE_ACCURACY",
    "METRIC_HIGHER_IS_BETTER",
    "OFFICIAL_DECATHLON_DOMAINS",
    "PUBLISHED_ACCURACY",
    "PUBLISHED_SCORE",
    "AccuracyMeter",
    "decathlon_score",
    "delta_m",
]


class AccuracyMeter:
    """Top-1 accuracy accumulated over every sample seen since the last :meth:`reset`.

    Samples whose label is negative (e.g. ``-1`` for "unlabelled" in partially labelled data)
    are ignored: they count neither as correct nor in the total. :meth:`compute` returns a
    fraction in [0, 1].
    """

    def __init__(self) -> None:
        self._correct = 0
        self._total = 0

    def reset(self) -> None:
        """Forget every sample seen so far."""
        self._correct = 0
        self._total = 0

    @torch.no_grad()
    def update(self, logits_or_preds: Tensor, labels: Tensor) -> None:
        """Add one batch.

        Args:
            logits_or_preds: ``[B, K]`` class scores (the arg-max is the prediction) or ``[B]``
                integer class predictions.
            labels: ``[B]`` integer class labels; entries ``< 0`` are ignored.
        """
        if labels.ndim != 1:
            raise ValueError(f"labels must have shape [B], got {tuple(labels.shape)}")
        if logits_or_preds.ndim == 2:
            preds = logits_or_preds.argmax(dim=1)
        elif logits_or_preds.ndim == 1:
            if logits_or_preds.is_floating_point():
                raise ValueError("1-D predictions must be integer class indices, got floats")
            preds = logits_or_preds
        else:
            raise ValueError(
                f"expected [B, K] logits or [B] predictions, got {tuple(logits_or_preds.shape)}"
            )
        if preds.shape[0] != labels.shape[0]:
            raise ValueError(
                f"batch sizes differ: {preds.shape[0]} predictions vs {labels.shape[0]} labels"
            )
        labels = labels.to(preds.device)
        valid = labels >= 0
        self._correct += int((preds[valid] == labels[valid]).sum().item())
        self._total += int(valid.sum().item())

    @property
    def count(self) -> int:
        """Number of labelled samples accumulated so far."""
        return self._total

    @property
    def correct(self) -> int:
        """Number of correctly classified samples accumulated so far."""
        return self._correct

    def compute(self) -> float:
        """Accuracy as a fraction in [0, 1]; raises ``ValueError`` when no sample was seen."""
        if self._total == 0:
            raise ValueError("AccuracyMeter has no labelled samples; accuracy is undefined")
        return self._correct / self._total


# --------------------------------------------------------------------------------------------
# Visual Decathlon
# --------------------------------------------------------------------------------------------

#: The ten official domains in alphabetical order; index + 1 is the d of the id encoding.
OFFICIAL_DECATHLON_DOMAINS: tuple[str, ...] = (
    "aircraft",
    "cifar100",
    "daimlerpedcls",
    "dtd",
    "gtsrb",
    "imagenet12",
    "omniglot",
    "svhn",
    "ucf101",
    "vgg-flowers",
)

# Column order of the published ResNet-26 table (URL, IJCV 2023, Table 2).
_TABLE_COLUMNS = (
    "imagenet12",
    "aircraft",
    "cifar100",
    "daimlerpedcls",
    "dtd",
    "gtsrb",
    "vgg-flowers",
    "omniglot",
    "svhn",
    "ucf101",
)


def _row(*values: float) -> dict[str, float]:
    return dict(zip(_TABLE_COLUMNS, values, strict=True))


PUBLISHED_ACCURACY: dict[str, dict[str, float]] = {
    "Finetune": _row(59.87, 60.34, 82.12, 92.82, 55.53, 97.53, 81.41, 87.69, 96.55, 51.20),
    "Parallel RA": _row(60.32, 64.21, 81.91, 94.73, 58.83, 99.38, 84.68, 89.21, 96.54, 50.94),
    "URL": _row(61.45, 74.35, 80.45, 97.55, 59.57, 98.24, 86.73, 89.72, 96.95, 49.01),
    "URL (RA)": _row(61.97, 77.17, 82.31, 97.58, 60.69, 98.75, 87.28, 90.40, 97.14, 51.89),
}
"""Published Visual Decathlon test accuracies (**percent**), ResNet-26 family."""

FINETUNE_ACCURACY: dict[str, float] = dict(PUBLISHED_ACCURACY["Finetune"])
"""The "Finetune" row (percent): the official reference that defines E_max of the score."""

PUBLISHED_SCORE: dict[str, float] = {
    "Finetune": 2500,
    "Parallel RA": 3412,
    "URL": 3626,
    "URL (RA)": 4005,
}
"""Published decathlon scores of the rows of :data:`PUBLISHED_ACCURACY`."""


def _check_fraction(kind: str, domain: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{kind} accuracy for {domain!r} is {value}; expected a fraction in [0, 1] "
            "(divide percentages by 100)"
        )


def decathlon_score(
    accuracy: dict[str, float],
    reference_accuracy: dict[str, float],
    gamma: float = 2.0,
) -> tuple[float, dict[str, float]]:
    """Visual Decathlon score (Rebuffi, Bilen & Vedaldi, NeurIPS 2017).

    ``S = Σ_d α_d · max(0, E_max_d − E_d)^γ`` with errors ``E = 1 − accuracy`` (fractions),
    ``E_max_d = 2 × reference error`` and ``α_d = 1000 / E_max_d^γ``. A perfect domain scores
    1000 and matching the reference scores ``1000 / 2^γ`` (250 for γ = 2). The official score
    uses the ResNet-26 "Finetune" row as reference (``FINETUNE_ACCURACY / 100``).

    When the reference error is 0, ``E_max_d = 0`` and α_d is undefined; that domain then
    scores 1000 if ``E_d == 0`` (matching a perfect reference) and 0 otherwise.

    Args:
        accuracy: per-domain accuracy, fractions in [0, 1]; the sum runs over these domains.
        reference_accuracy: per-domain reference accuracy, fractions in [0, 1].
        gamma: the exponent γ (2 in the official score).

    Returns:
        ``(total, per_domain)``.

    Raises:
        KeyError: a domain of ``accuracy`` is missing from ``reference_accuracy``.
        ValueError: an accuracy lies outside [0, 1].
    """
    per_domain: dict[str, float] = {}
    for domain, acc in accuracy.items():
        if domain not in reference_accuracy:
            raise KeyError(f"domain {domain!r} has no reference accuracy")
        ref = reference_accuracy[domain]
        _check_fraction("the", domain, acc)
        _check_fraction("reference", domain, ref)
        error = 1.0 - acc
        error_max = 2.0 * (1.0 - ref)
        if error_max == 0.0:
            per_domain[domain] = 1000.0 if error == 0.0 else 0.0
            continue
        alpha = 1000.0 / error_max**gamma
        per_domain[domain] = alpha * max(0.0, error_max - error) ** gamma
    return sum(per_domain.values()), per_domain


# --------------------------------------------------------------------------------------------
# Δm: mean relative change against a reference
# --------------------------------------------------------------------------------------------

METRIC_HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "miou": True,
    "pixel_acc": True,
    "within_11.25": True,
    "within_22.5": True,
    "within_30": True,
    "abs_err": False,
    "rel_err": False,
    "angle_mean": False,
    "angle_median": False,
}
"""Direction of every standard metric name (True: higher is better)."""


def delta_m(
    results: dict[str, dict[str, float]],
    reference: dict[str, dict[str, float]],
    higher_is_better: dict[str, bool] | None = None,
) -> float:
    """Δm in percent (Maninis et al., CVPR 2019; Vandenhende et al., TPAMI 2021).

    ``Δm = 100 / N · Σ_(t, m) (−1)^l · (M_t,m − M_ref_t,m) / |M_ref_t,m|`` over the N
    (task, metric) pairs present in both ``results`` and ``reference``, with ``l = 1`` when
    lower is better for metric m. Positive means better than the reference. Because each term
    is a ratio, fractions and percentages give the same result.

    Args:
        results: ``{task: {metric: value}}`` of the model being judged.
        reference: ``{task: {metric: value}}`` of the reference (e.g. the teachers, measured in
            the same run on the same split).
        higher_is_better: directions that extend or override :data:`METRIC_HIGHER_IS_BETTER`.

    Raises:
        ValueError: no common (task, metric) pair, a metric of unknown direction, a zero
            reference value, or a non-finite value.
    """
    directions = {**METRIC_HIGHER_IS_BETTER, **(higher_is_better or {})}
    terms: list[float] = []
    for task, task_results in results.items():
        task_reference = reference.get(task, {})
        for metric, value in task_results.items():
            if metric not in task_reference:
                continue
            if metric not in directions:
                raise ValueError(
                    f"unknown metric {metric!r} (task {task!r}); pass its direction in "
                    f"higher_is_better; known: {', '.join(sorted(directions))}"
                )
            ref = task_reference[metric]
            if not (math.isfinite(value) and math.isfinite(ref)):
                raise ValueError(f"non-finite value for {task}/{metric}: {value} vs {ref}")
            if ref == 0:
                raise ValueError(f"reference {task}/{metric} is 0; relative change is undefined")
            sign = 1.0 if directions[metric] else -1.0
            terms.append(sign * (value - ref) / abs(ref))
    if not terms:
        raise ValueError("results and reference share no (task, metric) pair")
    return 100.0 * sum(terms) / len(terms)


def official_decathlon_score(accuracy: dict[str, float | None]) -> float | None:
    """The Codalab score (reference: the published ResNet-26 Finetune errors), or None.

    Defined only when every domain is an official Visual Decathlon domain with a measured
    accuracy (fraction); a subset of the ten domains scores out of 1000 per domain present.
    """
    if not accuracy or any(d not in FINETUNE_ACCURACY or a is None for d, a in accuracy.items()):
        return None
    reference = {d: FINETUNE_ACCURACY[d] / 100 for d in accuracy}
    return decathlon_score({d: float(a) for d, a in accuracy.items()}, reference)[0]
