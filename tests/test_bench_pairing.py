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
        hymate_name(summaries, TrainConfig(warmup_epochs=0.5)),
        hymate_name(summaries, TrainConfig(pos_weight=1.0)),
        hymate_name(ModelOptions(), TrainConfig()),
    }
    assert names == {
        "HyMaTE+summaries",
        "HyMaTE+summaries+trainval",
        "HyMaTE+summaries+ema0.998",
        "HyMaTE+summaries+trainval+ema0.998",
        "HyMaTE+summaries+warmup0.5",
        "HyMaTE+summaries+unweighted",
        "HyMaTE",
    }


def _saved_rows(folder: Path, row: str, signal: float, seeds: range, labels: np.ndarray) -> None:
    from pair_predictions import save_predictions

    for seed in seeds:
        save_predictions(folder, row, seed, _predictions(labels, seed, signal))


def test_saved_predictions_pair_by_seed_with_the_stronger_model_ahead_on_every_line(tmp_path, capsys):
    from pair_predictions import main

    labels = (np.arange(400) % 5 == 0).astype(float)
    _saved_rows(tmp_path, "DP --summary-branch", 3.0, range(3), labels)
    _saved_rows(tmp_path, "DP", 0.5, range(1, 4), labels)  # seed 3 has no partner: left out

    assert (
        main([str(tmp_path / "DP_summary_branch_seed*.npz"), str(tmp_path / "DP_seed*.npz"), "--bootstrap", "100"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("seeds [1, 2] (400 test stays)")
    per_seed = [line for line in out.splitlines() if line.strip().startswith("seed ") and "AUROC" in line]
    assert len(per_seed) == 2
    for line in per_seed:
        low = float(line.split("[")[1].split(",")[0])
        assert low > 0, line  # the paired interval of the stronger model excludes zero
    summary = next(line for line in out.splitlines() if "AUROC A-B seed-averaged" in line)
    assert float(summary.split("[")[1].split(",")[0]) > 0
    ratio = next(line for line in out.splitlines() if "AUROC A/B over the seeds" in line)
    assert float(ratio.split(":")[1].split("±")[0]) > 1


def test_saved_predictions_of_other_stays_or_no_common_seed_are_refused_by_name(tmp_path, capsys):
    from pair_predictions import main

    labels = (np.arange(100) % 4 == 0).astype(float)
    _saved_rows(tmp_path / "a", "DP", 1.0, range(2), labels)
    _saved_rows(tmp_path / "b", "DP", 1.0, range(2), labels[::-1])
    _saved_rows(tmp_path / "c", "DP", 1.0, range(5, 6), labels)
    a = str(tmp_path / "a" / "*.npz")

    assert main([a, str(tmp_path / "b" / "*.npz")]) == 2
    assert "seed 0: A and B were not scored on the same test stays" in capsys.readouterr().err
    assert main([a, str(tmp_path / "c" / "*.npz")]) == 2
    assert "no seed in common: A has [0, 1], B has [5]" in capsys.readouterr().err
    assert main([a, str(tmp_path / "missing" / "*.npz")]) == 2
    assert "no prediction files match" in capsys.readouterr().err


@pytest.mark.parametrize("argv, pos_weight", [(["--class-weight", "none"], 1.0), ([], None)])
def test_the_benches_take_hymate_sims_class_weight_flag(argv, pos_weight):
    from bench_cli import build_parser, hymate_settings

    args = build_parser("doc", "bench-test").parse_args(argv + ["--warmup-epochs", "0.5"])
    _, config = hymate_settings(args, seed=3)
    assert (config.pos_weight, config.warmup_epochs, config.seed) == (pos_weight, 0.5, 3)
