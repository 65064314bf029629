"""The tuned baselines: parameters from their grid, early stopping, skill on unseen stays."""

import pytest

from hymate.baseline import BASELINES, fit_baseline
from hymate.data import SyntheticConfig, make_synthetic
from hymate.metrics import auroc


@pytest.fixture(scope="module")
def stays():
    return make_synthetic(SyntheticConfig(seed=3, stays_per_site=150)), make_synthetic(
        SyntheticConfig(seed=4, stays_per_site=150)
    )


def test_logistic_regression_picks_its_c_by_cross_validation_and_ranks_unseen_stays(stays):
    train, test = stays
    grid = {"logisticregression__C": BASELINES["logistic"].grid["logisticregression__C"][:2]}
    fitted = fit_baseline("logistic", train, seed=0, folds=2, grid=grid)
    assert fitted.params["logisticregression__C"] in grid["logisticregression__C"]
    assert 1.0 < fitted.cv_score < 2.0  # out-of-fold AUROC + AUPRC
    assert auroc(test.labels, fitted.predict(test)) > 0.75


@pytest.mark.slow
def test_gradient_boosting_picks_from_the_grid_and_stops_early_on_its_own_split(stays):
    train, test = stays
    grid = {"learning_rate": (0.1,), "max_leaf_nodes": (7, 15)}
    fitted = fit_baseline("gradient-boosting", train, seed=1, folds=2, grid=grid)
    assert fitted.params["max_leaf_nodes"] in (7, 15) and fitted.params["learning_rate"] == 0.1
    assert fitted.model.n_iter_ < fitted.model.max_iter
    assert auroc(test.labels, fitted.predict(test)) > 0.75


def test_an_unknown_baseline_is_named_in_the_error(stays):
    with pytest.raises(ValueError, match="unknown baseline 'xgb'; valid: gradient-boosting, logistic"):
        fit_baseline("xgb", stays[0])
