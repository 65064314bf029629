"""Paired bootstrap of a metric difference: values, pairing, and bad input."""

import numpy as np
import pytest

from hymate.metrics import auroc, bootstrap_interval, paired_bootstrap_difference


def _scored(n: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.2).astype(int)
    signal = labels + rng.normal(0, 1.0, n)
    return rng, labels, signal


def test_the_same_model_on_both_sides_differs_by_exactly_zero():
    _, labels, signal = _scored()
    interval = paired_bootstrap_difference("auroc", labels, [signal], [signal], n_resamples=50)
    assert (interval.value, interval.low, interval.high) == (0.0, 0.0, 0.0)


def test_the_value_is_the_difference_of_the_seed_means():
    rng, labels, signal = _scored()
    a = [signal + rng.normal(0, 0.3, len(labels)) for _ in range(3)]
    b = [rng.normal(0, 1, len(labels)) + 0.3 * labels for _ in range(2)]
    interval = paired_bootstrap_difference("auprc", labels, a, b, n_resamples=100)
    from hymate.metrics import auprc

    expected = np.mean([auprc(labels, s) for s in a]) - np.mean([auprc(labels, s) for s in b])
    assert interval.value == pytest.approx(expected)
    assert 0 < interval.low < interval.value < interval.high


def test_pairing_makes_a_small_difference_between_correlated_models_visible():
    rng, labels, signal = _scored(n=800, seed=1)
    better = signal + 0.15 * labels  # the same scores, nudged towards the truth
    paired = paired_bootstrap_difference("auroc", labels, [better], [signal], n_resamples=300)
    alone_better = bootstrap_interval("auroc", labels, better, n_resamples=300)
    alone_signal = bootstrap_interval("auroc", labels, signal, n_resamples=300)
    assert paired.value == pytest.approx(auroc(labels, better) - auroc(labels, signal))
    assert paired.low > 0  # excluded zero once the shared test-set noise cancels...
    assert alone_better.low < alone_signal.high  # ...which separate intervals, overlapping, cannot show
    assert paired.high - paired.low < 0.25 * (alone_better.high - alone_better.low)


def test_scores_that_do_not_pair_with_the_labels_are_refused():
    _, labels, signal = _scored()
    with pytest.raises(ValueError, match="do not pair"):
        paired_bootstrap_difference("auroc", labels, [signal], [signal[:-1]])
    with pytest.raises(ValueError, match="at least one"):
        paired_bootstrap_difference("auroc", labels, [], [signal])
