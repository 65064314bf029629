"""The baseline a clinical data scientist tries first: gradient boosting on summary statistics.

Each stay becomes first, last, min, max, mean and count of every variable plus the static
features (NaN where unmeasured, which HistGradientBoosting handles natively). HyMaTE has to
beat this to be worth its cost.
"""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier

from hymate.data.stays import StayTable

SUMMARIES = ("first", "last", "min", "max", "mean", "count")


def summary_features(table: StayTable) -> np.ndarray:
    """(N, 6 * V + S) features: per-variable summaries, then the static features."""
    n, v = len(table), len(table.variables)
    stay = np.repeat(np.arange(n), table.lengths)
    cell = stay * (v + 1) + table.variable_ids  # one cell per (stay, variable)
    size = n * (v + 1)
    values = table.values.astype(np.float64)
    count = np.bincount(cell, minlength=size).astype(np.float64)
    total = np.bincount(cell, weights=values, minlength=size)
    low = np.full(size, np.inf)
    np.minimum.at(low, cell, values)
    high = np.full(size, -np.inf)
    np.maximum.at(high, cell, values)
    # Events are time-sorted within a stay: the first/last event of a cell in array order.
    first = np.full(size, np.nan)
    first[cell[::-1]] = values[::-1]
    last = np.full(size, np.nan)
    last[cell] = values
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    seen = count > 0
    columns = []
    for stat in (first, last, np.where(seen, low, np.nan), np.where(seen, high, np.nan), mean, count):
        columns.append(stat.reshape(n, v + 1)[:, 1:])
    return np.hstack(columns + [table.static.astype(np.float64)])


def fit_gradient_boosting(train: StayTable, seed: int = 0) -> HistGradientBoostingClassifier:
    """Columns no training stay fills (a shared-vocabulary variable the source never records)
    become 0 for the fit: they carry no information, and scikit-learn's binning fails on a
    column with no value at all. The model never splits on them, so predictions ignore them."""
    features = summary_features(train)
    features[:, np.isnan(features).all(axis=0)] = 0.0
    model = HistGradientBoostingClassifier(random_state=seed)
    return model.fit(features, train.labels)


def predict_gradient_boosting(model: HistGradientBoostingClassifier, table: StayTable) -> np.ndarray:
    return model.predict_proba(summary_features(table))[:, 1]
