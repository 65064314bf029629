"""Discrimination and calibration metrics for binary clinical outcomes.

AUROC and AUPRC come from scikit-learn (imported on first use: every federated message
starts a fresh process, and scikit-learn's import alone costs a second there). A set with one
class only (a small site with no deaths) has no AUROC: it is reported as NaN, not as an
exception, because federations meet such sites in practice and the rest of the evaluation
must go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def auprc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (the step-wise area under the precision-recall curve)."""
    labels = np.asarray(labels)
    if labels.sum() == 0:
        return float("nan")
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(labels, scores))


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean((np.asarray(probs) - np.asarray(labels)) ** 2)) if len(labels) else float("nan")


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """Mean |observed rate - predicted probability| over equal-width bins, weighted by bin size."""
    labels, probs = np.asarray(labels, dtype=float), np.asarray(probs, dtype=float)
    if not len(labels):
        return float("nan")
    bins = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    error = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        error += in_bin.sum() * abs(labels[in_bin].mean() - probs[in_bin].mean())
    return float(error / len(labels))


METRICS = {
    "auroc": auroc,
    "auprc": auprc,
    "brier": brier,
    "ece": expected_calibration_error,
}


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float


def bootstrap_interval(
    metric: str,
    labels: np.ndarray,
    probs: np.ndarray,
    n_resamples: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The metric with a percentile bootstrap interval over stays (resamples lacking a class are skipped)."""
    fn = METRICS[metric]
    labels, probs = np.asarray(labels), np.asarray(probs)
    value = fn(labels, probs)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(labels), len(labels))
        draw = fn(labels[idx], probs[idx])
        if np.isfinite(draw):
            draws.append(draw)
    if not draws:
        return Interval(value, float("nan"), float("nan"))
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return Interval(value, float(low), float(high))


def paired_bootstrap_difference(
    metric: str,
    labels: np.ndarray,
    scores_a: Sequence[np.ndarray],
    scores_b: Sequence[np.ndarray],
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Mean metric of ``scores_a`` minus that of ``scores_b`` on the same stays, with a paired
    percentile bootstrap interval.

    Each score array is one fitted model (a seed) scoring every stay of ``labels``; the value
    is the mean of the metric over a's seeds minus the mean over b's. Every resample draws the
    stays once and scores all models on that draw, so the interval carries the test set's
    sampling noise without the between-model correlation that unpaired intervals ignore.
    Seed-to-seed variation is in the value, not in the interval: report the seeds' sd beside it.
    """
    fn = METRICS[metric]
    labels = np.asarray(labels)
    a = [np.asarray(s) for s in scores_a]
    b = [np.asarray(s) for s in scores_b]
    if not a or not b:
        raise ValueError("paired_bootstrap_difference needs at least one score array on each side")
    for s in a + b:
        if s.shape != labels.shape:
            raise ValueError(f"scores of shape {s.shape} do not pair with {labels.shape} labels")

    def difference(idx: np.ndarray) -> float:
        y = labels[idx]
        return float(np.mean([fn(y, s[idx]) for s in a]) - np.mean([fn(y, s[idx]) for s in b]))

    value = difference(np.arange(len(labels)))
    rng = np.random.default_rng(seed)
    draws = [difference(rng.integers(0, len(labels), len(labels))) for _ in range(n_resamples)]
    draws = [d for d in draws if np.isfinite(d)]
    if not draws:
        return Interval(value, float("nan"), float("nan"))
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return Interval(value, float(low), float(high))
