"""The baselines a clinical data scientist tries first: gradient boosting and logistic
regression on per-stay summary statistics.

Each stay becomes first, last, min, max, mean and count of every variable plus the static
features (NaN where unmeasured, which HistGradientBoosting handles natively). HyMaTE has to
beat these to be worth its cost, so they get what a careful analyst would give them: all
development stays (they need no separate validation set), the booster's own early stopping
on an internal split, and a small grid chosen by patient-level stratified cross-validation on
AUROC + AUPRC (what HyMaTE's early stopping maximises).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import QuantileTransformer

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


@dataclass(frozen=True)
class BaselineKind:
    """An estimator and the grid tried around it."""

    name: str
    estimator: BaseEstimator
    grid: dict[str, tuple[Any, ...]]


BASELINES: dict[str, BaselineKind] = {
    "gradient-boosting": BaselineKind(
        "HistGradientBoosting",
        # Its own early stopping: 10 % of the stays it is given, 30 rounds of patience.
        HistGradientBoostingClassifier(max_iter=1000, early_stopping=True, n_iter_no_change=30),
        {"learning_rate": (0.03, 0.1), "max_leaf_nodes": (15, 31), "l2_regularization": (0.0, 1.0)},
    ),
    "logistic": BaselineKind(
        "LogisticRegression",
        # Skewed labs (urine, enzymes) enter as normal scores; unmeasured values as the median
        # plus an indicator.
        make_pipeline(
            SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
            QuantileTransformer(output_distribution="normal", n_quantiles=200),
            LogisticRegression(max_iter=3000),
        ),
        {"logisticregression__C": (0.003, 0.01, 0.03, 0.1)},
    ),
}


@dataclass(frozen=True)
class FittedBaseline:
    kind: str
    model: BaseEstimator
    params: dict[str, Any]
    cv_score: float  # out-of-fold AUROC + AUPRC of the chosen parameters (NaN: a one-point grid, no CV)

    def predict(self, table: StayTable) -> np.ndarray:
        return self.model.predict_proba(summary_features(table))[:, 1]


def _seeded(estimator: BaseEstimator, params: dict[str, Any], seed: int) -> BaseEstimator:
    model = clone(estimator).set_params(**params)
    seeds = {k: seed for k in model.get_params() if k.endswith("random_state")}
    return model.set_params(**seeds)


def fit_baseline(
    kind: str, train: StayTable, seed: int = 0, folds: int = 3, grid: dict[str, tuple[Any, ...]] | None = None
) -> FittedBaseline:
    """Choose ``kind``'s parameters by patient-level stratified CV on ``train``, then refit on all of it.

    ``grid`` replaces the kind's own (a smaller one for quick checks)."""
    try:
        spec = BASELINES[kind]
    except KeyError:
        raise ValueError(f"unknown baseline {kind!r}; valid: {', '.join(BASELINES)}") from None
    grid = spec.grid if grid is None else grid
    features, labels = summary_features(train), train.labels.astype(int)
    # Columns no training stay fills (a shared-vocabulary variable the source never records) carry
    # no information, and scikit-learn's binning fails on a column with no value: 0 for the fit.
    features[:, np.isnan(features).all(axis=0)] = 0.0
    choices = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    if len(choices) == 1:  # nothing to choose between: no cross-validation
        model = _seeded(spec.estimator, choices[0], seed).fit(features, labels)
        return FittedBaseline(kind, model, choices[0], float("nan"))
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_rows = list(cv.split(features, labels, groups=train.patient_ids.astype(str)))
    best: tuple[float, dict[str, Any]] | None = None
    for params in choices:
        out_of_fold = np.zeros(len(labels))
        for fit_rows, held_rows in fold_rows:
            model = _seeded(spec.estimator, params, seed).fit(features[fit_rows], labels[fit_rows])
            out_of_fold[held_rows] = model.predict_proba(features[held_rows])[:, 1]
        score = roc_auc_score(labels, out_of_fold) + average_precision_score(labels, out_of_fold)
        if best is None or score > best[0]:
            best = (score, params)
    assert best is not None
    model = _seeded(spec.estimator, best[1], seed).fit(features, labels)
    return FittedBaseline(kind, model, best[1], float(best[0]))
