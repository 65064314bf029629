"""keep-round: a federation ends with its last round's model, or with the round its sites'
validation stays rate best (by AUROC + AUPRC, or by loss); the test stays never choose, and a
site cannot claim an AUROC outside [0, 1] or a negative loss to sway the choice."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hymate.settings_fields import RunConfigError, run_config_of
from server.federation import FederationError, weights_from
from server.round_selection import (
    KeptRound,
    RoundSelection,
    average_weights,
    kept_round,
    validation_loss,
    validation_score,
    with_averaged_rounds,
)
from server.run_dir import RunDirectory
from simulation.cli import build_parser, spec_from_args
from tests.fake_grid import FakeGrid, FakeSite
from tests.test_site_identity import round_metrics, run, settings


def entry(server_round: int, *sites: dict, failed: bool = False) -> dict:
    e = {"round": server_round, "sites": {"evaluate": {f"s{i}": m for i, m in enumerate(sites)}}}
    return e | {"failed": "halted"} if failed else e


def val(auroc: float, auprc: float = 0.2, n: int = 10, test_auroc: float = 0.5, loss: float | None = None) -> dict:
    losses = {} if loss is None else {"val-loss": loss}
    return {"auroc": test_auroc, "val-auroc": auroc, "val-auprc": auprc, "val-num-examples": n} | losses


def test_validation_score_weights_each_metric_by_the_sites_validation_stays():
    # AUROC (0.9 * 30 + 0.5 * 10) / 40 = 0.8; AUPRC (0.4 * 30 + 0.2 * 10) / 40 = 0.35.
    assert validation_score(entry(1, val(0.9, 0.4, 30), val(0.5, 0.2, 10))) == pytest.approx(1.15)
    # A site whose validation stays hold one class (NaN, stored as null) is left out of that mean.
    assert validation_score(entry(1, val(0.9, 0.4, 30), val(None, None, 10))) == pytest.approx(1.3)
    assert validation_score(entry(1, {"auroc": 0.7})) is None


def test_validation_loss_is_the_loss_over_every_sites_validation_stays():
    # (0.3 * 30 + 0.7 * 10) / 40: the pooled loss when the sites share one class weight.
    assert validation_loss(entry(1, val(0.9, loss=0.3, n=30), val(0.5, loss=0.7, n=10))) == pytest.approx(0.4)
    # A site with no validation stays reports NaN (stored as null): left out.
    assert validation_loss(entry(1, val(0.9, loss=0.3, n=30), val(None, loss=None, n=0))) == pytest.approx(0.3)
    assert validation_loss(entry(1, val(0.9))) is None


def test_best_loss_keeps_the_lowest_validation_loss_round_whatever_the_rank_metrics_say():
    history = [
        entry(1, val(0.6, loss=0.70)),
        entry(2, val(0.9, loss=0.65)),  # a noisy peak of the rank metrics: "best" would stop here
        entry(3, val(0.7, loss=0.55, test_auroc=0.1)),
        entry(4, val(0.7, loss=0.40), failed=True),  # a failed round changed nothing
        entry(5, val(0.8, loss=0.55)),  # a tie with round 3: the earlier round
    ]
    assert kept_round(history, "best").round == 2
    kept = kept_round(history, "best-loss")
    assert kept == KeptRound(3, "lowest validation loss", pytest.approx(0.9), pytest.approx(0.55))
    # Sites that report no validation loss: the last round, saying so.
    fallback = kept_round([entry(1, val(0.9)), entry(2, val(0.6))], "best-loss")
    assert fallback.round == 2 and "no site reported validation metrics" in fallback.rule


def test_best_keeps_the_highest_validation_round_and_never_looks_at_the_test_stays():
    history = [
        entry(1, val(0.6, test_auroc=0.99)),
        entry(2, val(0.8, test_auroc=0.5)),
        entry(3, val(0.8, test_auroc=0.6)),  # a tie with round 2: the earlier round
        entry(4, val(0.95), failed=True),  # a failed round changed nothing
        entry(5, val(0.7, test_auroc=0.9)),
    ]
    assert kept_round(history, "best") == KeptRound(2, "best validation AUROC + AUPRC", pytest.approx(1.0), None)
    assert kept_round(history, "last").round == 5


def test_best_falls_back_to_the_last_round_and_says_so_without_validation_metrics():
    kept = kept_round([entry(1, {"auroc": 0.9}), entry(2, {"auroc": 0.6})], "best")
    assert (kept.round, kept.validation_score) == (2, None)
    assert "no site reported validation metrics" in kept.rule
    all_failed = kept_round([entry(1, failed=True), entry(2, failed=True)], "best")
    assert all_failed.round == 2 and "every round failed" in all_failed.rule


def test_an_unknown_rule_is_refused_naming_the_key_and_the_choices():
    with pytest.raises(RunConfigError, match=r"keep-round must be one of last, best, best-loss, got 'first'"):
        RoundSelection("first")


def test_the_coordinator_saves_the_kept_rounds_model_and_says_which(tmp_path):
    val_auroc = {1: 0.60, 2: 0.90, 3: 0.70}
    sites = [FakeSite(1, "h-1", step=0.25, val_auroc=val_auroc), FakeSite(2, "h-2", step=0.25, val_auroc=val_auroc)]
    s = settings(tmp_path, rounds=3, selection=RoundSelection("best"), registered_sites=("h-1", "h-2"))
    card = run(FakeGrid(sites), s)

    rounds = RunDirectory(s.run_dir)
    saved = {k: v.numpy() for k, v in rounds.load_model().state_dict.items()}
    second, third = rounds.read_round(2).weights, rounds.read_round(3).weights
    name = next(k for k in saved if k.endswith("weight"))
    assert not np.allclose(second[name], third[name])  # the rounds' models differ ...
    assert all(np.array_equal(saved[k], second[k]) for k in saved)  # ... and round 2's was saved
    assert card["training"]["kept_round"] == {
        "round": 2,
        "rule": "best validation AUROC + AUPRC",
        "validation_auroc_plus_auprc": pytest.approx(1.2),
        "validation_loss": None,  # these sites report none
        "averaged_rounds": [],
    }
    assert card["final_evaluation"]["round"] == 2
    assert round_metrics(s, 2)["evaluate"]["val-auroc"] == pytest.approx(0.9)
    md = (s.run_dir / "model_card.md").read_text()
    assert "Kept: round 2 (best validation AUROC + AUPRC)." in md
    assert json.loads((s.run_dir / "model_card.json").read_text())["training"]["kept_round"]["round"] == 2


def test_the_coordinator_keeps_the_lowest_validation_loss_round_under_best_loss(tmp_path):
    sites = [
        FakeSite(1, "h-1", step=0.25, val_auroc={1: 0.9, 2: 0.6, 3: 0.6}, val_loss={1: 0.7, 2: 0.5, 3: 0.6}),
        FakeSite(2, "h-2", step=0.25, val_auroc={1: 0.9, 2: 0.6, 3: 0.6}, val_loss={1: 0.7, 2: 0.3, 3: 0.6}),
    ]
    s = settings(tmp_path, rounds=3, selection=RoundSelection("best-loss"), registered_sites=("h-1", "h-2"))
    card = run(FakeGrid(sites), s)
    assert card["training"]["kept_round"] == {
        "round": 2,
        "rule": "lowest validation loss",
        "validation_auroc_plus_auprc": pytest.approx(0.9),
        "validation_loss": pytest.approx(0.4),
        "averaged_rounds": [],
    }
    saved = RunDirectory(s.run_dir).load_model().state_dict
    second = RunDirectory(s.run_dir).read_round(2).weights
    assert all(np.array_equal(saved[k].numpy(), second[k]) for k in second)


def test_by_default_the_last_round_is_kept(tmp_path):
    sites = [FakeSite(1, step=0.25, val_auroc={1: 0.9, 2: 0.6})]
    s = settings(tmp_path, rounds=2)
    card = run(FakeGrid(sites), s)
    assert card["training"]["kept_round"]["round"] == 2
    saved = RunDirectory(s.run_dir).load_model().state_dict
    last = RunDirectory(s.run_dir).read_round(2).weights
    assert all(np.array_equal(saved[k].numpy(), last[k]) for k in last)


def test_a_site_claiming_a_validation_auroc_above_one_is_rejected(tmp_path):
    honest = FakeSite(1, "honest", val_auroc={1: 0.6, 2: 0.6})
    liar = FakeSite(2, "liar", val_auroc={1: 0.6, 2: 7.0})  # would make round 2 the "best"
    s = settings(tmp_path, rounds=2, selection=RoundSelection("best"), registered_sites=("honest", "liar"))
    card = run(FakeGrid([honest, liar]), s)
    rejected = [r for r in card["rejected_replies"] if r["phase"] == "evaluate"]
    assert [(r["site"], r["reason"]) for r in rejected] == [("liar", "metric 'val-auroc' must lie in [0, 1], got 7.0")]
    assert card["training"]["kept_round"]["round"] == 1  # the tie between the honest rounds: the earlier


def test_a_site_claiming_a_negative_validation_loss_is_rejected(tmp_path):
    honest = FakeSite(1, "honest", val_auroc={1: 0.6, 2: 0.6}, val_loss={1: 0.5, 2: 0.6})
    liar = FakeSite(2, "liar", val_auroc={1: 0.6, 2: 0.6}, val_loss={1: 0.5, 2: -50.0})  # would make round 2 "best"
    s = settings(tmp_path, rounds=2, selection=RoundSelection("best-loss"), registered_sites=("honest", "liar"))
    card = run(FakeGrid([honest, liar]), s)
    rejected = [(r["site"], r["reason"]) for r in card["rejected_replies"] if r["phase"] == "evaluate"]
    assert rejected == [("liar", "metric 'val-loss' must not be negative, got -50.0")]
    assert card["training"]["kept_round"]["round"] == 1


def test_hymate_sim_passes_keep_round_to_its_federation():
    args = build_parser().parse_args(["--keep-round", "best", "--out", "unused-out"])
    spec = spec_from_args(args)
    assert run_config_of(spec.selection) == {"keep-round": "best", "average-rounds": 1}
    args = build_parser().parse_args(["--average-rounds", "5", "--out", "unused-out"])
    assert run_config_of(spec_from_args(args).selection) == {"keep-round": "last", "average-rounds": 5}


def test_averaging_takes_the_completed_rounds_up_to_the_kept_one():
    history = [entry(1, val(0.6)), entry(2, val(0.9)), entry(3, val(0.7), failed=True), entry(4, val(0.8))]
    last = kept_round(history, "last")
    assert with_averaged_rounds(history, last, 3).averaged_rounds == (1, 2, 4)  # the failed round changed nothing
    assert with_averaged_rounds(history, last, 10).averaged_rounds == (1, 2, 4)  # fewer completed: all of them
    assert with_averaged_rounds(history, kept_round(history, "best"), 3).averaged_rounds == (1, 2)
    assert with_averaged_rounds(history, last, 1).averaged_rounds == ()  # one round: nothing to average
    assert (
        with_averaged_rounds([entry(1, failed=True)], kept_round([entry(1, failed=True)], "last"), 3).averaged_rounds
        == ()
    )


def test_average_weights_is_the_elementwise_mean_in_each_arrays_own_dtype():
    rounds = [
        {"w": np.array([1.0, 2.0], dtype=np.float32), "steps": np.array(3)},
        {"w": np.array([3.0, 6.0], dtype=np.float32), "steps": np.array(4)},
    ]
    mean = average_weights(rounds)
    assert mean["w"].dtype == np.float32 and np.array_equal(mean["w"], [2.0, 4.0])
    assert mean["steps"] == 4  # an integer array is the last round's


def test_average_rounds_below_one_is_refused_naming_the_key():
    with pytest.raises(RunConfigError, match="average-rounds must be at least 1, got 0"):
        RoundSelection(average_rounds=0)


def test_the_coordinator_saves_the_mean_of_the_last_rounds_and_has_the_sites_evaluate_it(tmp_path):
    sites = [FakeSite(1, "h-1", step=0.25), FakeSite(2, "h-2", step=0.25)]
    s = settings(tmp_path, rounds=3, selection=RoundSelection(average_rounds=2), registered_sites=("h-1", "h-2"))
    grid = FakeGrid(sites)
    card = run(grid, s)

    rounds = RunDirectory(s.run_dir)
    saved = {k: v.numpy() for k, v in rounds.load_model().state_dict.items()}
    second, third = rounds.read_round(2).weights, rounds.read_round(3).weights
    name = next(k for k in saved if k.endswith("weight") and np.issubdtype(saved[k].dtype, np.floating))
    assert not np.allclose(second[name], third[name])
    for k in saved:
        if np.issubdtype(saved[k].dtype, np.floating):
            np.testing.assert_allclose(saved[k], (second[k].astype(np.float64) + third[k]) / 2, rtol=1e-6)
    assert card["training"]["kept_round"]["averaged_rounds"] == [2, 3]
    assert card["final_evaluation"]["averaged_rounds"] == [2, 3]
    # Every site evaluated the averaged model in a last message: the card's metrics are the saved model's.
    evaluations = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert len(evaluations) == 3 * 2 + 2
    sent = weights_from(evaluations[-1].content["arrays"], third)
    assert all(np.array_equal(sent[k], saved[k]) for k in saved)
    md = (s.run_dir / "model_card.md").read_text()
    assert "Kept: round 3 (last), the mean of the models of rounds 2, 3." in md
    assert "## Final evaluation (the model saved: the mean of rounds 2, 3," in md


class SitesLeaveAfterTheLastRound(FakeGrid):
    """Every site disconnects once it has evaluated the last round's model: the averaged
    model's evaluation, one message later, finds nobody."""

    rounds: int = 3

    def get_nodes(self):
        evaluated = sum(m.metadata.message_type == "evaluate" for m in self.sent)
        return [] if evaluated >= self.rounds * len(self.sites) else super().get_nodes()


def test_sites_gone_before_the_averaged_evaluation_lose_nothing_and_resume_writes_the_mean(tmp_path):
    s = settings(
        tmp_path, rounds=3, wait_for_clients=1.0, selection=RoundSelection(average_rounds=2), registered_sites=("h-1",)
    )
    with pytest.raises(FederationError, match="only 0 of the required 1 sites connected"):
        run(SitesLeaveAfterTheLastRound([FakeSite(1, "h-1", step=0.25)]), s)
    rounds = RunDirectory(s.run_dir)
    assert rounds.completed_rounds() == [1, 2, 3]  # every round's checkpoint is on disk
    assert not (s.run_dir / "model_card.json").exists()  # no card for a model the sites never evaluated
    events = [json.loads(line)["event"] for line in rounds.events_file.read_text().splitlines()]
    assert events[-1] == "run-failed"

    # The site is back: --resume trains nothing more, averages rounds 2 and 3, and has them evaluated.
    grid = FakeGrid([FakeSite(5, "h-1", step=0.25)])
    card = run(
        grid,
        settings(
            tmp_path, rounds=3, resume=True, selection=RoundSelection(average_rounds=2), registered_sites=("h-1",)
        ),
    )
    assert [m.metadata.message_type for m in grid.sent] == ["evaluate"]
    assert card["training"]["kept_round"]["averaged_rounds"] == [2, 3]
    saved = rounds.load_model().state_dict
    second, third = rounds.read_round(2).weights, rounds.read_round(3).weights
    for k, v in saved.items():
        if np.issubdtype(v.numpy().dtype, np.floating):
            np.testing.assert_allclose(v.numpy(), (second[k].astype(np.float64) + third[k]) / 2, rtol=1e-6)
