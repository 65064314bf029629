"""The benches' paired comparison: runs scored on the same test stays, differenced per resample."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from variants import paired_scores  # noqa: E402

from simulation.evaluation import Predictions  # noqa: E402


def _predictions(labels: np.ndarray, seed: int, signal: float) -> Predictions:
    noise = np.random.default_rng(seed).normal(size=len(labels))
    return Predictions(labels, signal * labels + noise)


def test_a_better_model_is_ahead_with_an_interval_that_excludes_zero_and_itself_is_level():
    labels = (np.arange(400) % 5 == 0).astype(float)
    weak, strong = _predictions(labels, 0, 0.5), _predictions(labels, 1, 3.0)
    cells = paired_scores([strong], [weak], "weak", n_resamples=200)
    value, low, high = (
        float(x) for x in cells["d AUROC vs weak"].replace("[", "").replace("]", "").replace(",", "").split()
    )
    assert 0 < low < value < high
    assert set(cells) == {"d AUROC vs weak", "d AUPRC vs weak"}
    assert paired_scores([weak], [weak], "itself", n_resamples=50)["d AUROC vs itself"] == "+0.000 [+0.000, +0.000]"


def test_runs_on_other_stays_are_not_paired():
    labels = (np.arange(100) % 4 == 0).astype(float)
    with pytest.raises(ValueError, match="not scored on the same test stays"):
        paired_scores([_predictions(labels[::-1], 0, 1.0)], [_predictions(labels, 0, 1.0)], "other")


def test_fitting_variants_written_to_one_folder_keep_apart_names():
    from comparison import hymate_name

    from hymate.model import ModelOptions
    from hymate.train import TrainConfig

    summaries = ModelOptions(summary_branch=True)
    names = {
        hymate_name(summaries, TrainConfig()),
        hymate_name(summaries, TrainConfig(validation_stays="train")),
        hymate_name(summaries, TrainConfig(ema_decay=0.998)),
        hymate_name(summaries, TrainConfig(validation_stays="train", ema_decay=0.998)),
        hymate_name(ModelOptions(), TrainConfig()),
    }
    assert names == {
        "HyMaTE+summaries",
        "HyMaTE+summaries+trainval",
        "HyMaTE+summaries+ema0.998",
        "HyMaTE+summaries+trainval+ema0.998",
        "HyMaTE",
    }
