"""lr-schedule: the sites' learning rate over a federation's rounds, constant or annealed by a
cosine as centralized training anneals it over its epochs; sent in every round's plan."""

from __future__ import annotations

import math

import pytest

from hymate.settings_fields import RunConfigError
from server.run_dir import RunDirectory
from server.settings import ServerSettings
from tests.fake_grid import FakeGrid, FakeSite
from tests.test_site_identity import run, settings


def test_cosine_starts_at_the_full_rate_and_anneals_towards_zero():
    s = ServerSettings(rounds=4, learning_rate=0.01, lr_schedule="cosine")
    rates = [s.learning_rate_at(r) for r in (1, 2, 3, 4)]
    assert rates == pytest.approx(
        [0.01, 0.01 * (1 + math.cos(math.pi / 4)) / 2, 0.005, 0.01 * (1 - math.cos(math.pi / 4)) / 2]
    )
    assert rates[-1] > 0  # the last round still trains
    assert ServerSettings(rounds=4, learning_rate=0.01).learning_rate_at(3) == 0.01  # constant, the default


def test_an_unknown_schedule_is_refused_naming_the_choices():
    with pytest.raises(RunConfigError, match="lr-schedule must be one of constant, cosine, plateau, got 'step'"):
        ServerSettings(lr_schedule="step")


def test_every_round_sends_its_rate_and_the_card_names_the_schedule(tmp_path):
    grid = FakeGrid([FakeSite(1, "h-1")])
    card = run(grid, settings(tmp_path, rounds=3, learning_rate=0.02, lr_schedule="cosine", registered_sites=("h-1",)))
    sent = [
        (
            m.metadata.message_type.split(".")[0],
            m.content["config"]["server-round"],
            m.content["config"]["learning_rate"],
        )
        for m in grid.sent
        if m.metadata.message_type != "query"
    ]
    expected = {r: 0.02 * (1 + math.cos(math.pi * (r - 1) / 3)) / 2 for r in (1, 2, 3)}
    assert [(kind, r) for kind, r, _ in sent] == [(k, r) for r in (1, 2, 3) for k in ("train", "evaluate")]
    assert all(rate == pytest.approx(expected[r]) for _, r, rate in sent)
    assert card["training"]["lr_schedule"] == "cosine"


def scored(*scores: float | None, failed: int | None = None) -> list[dict]:
    """Round metrics whose validation AUROC is each score (AUPRC 0); None: no validation metrics."""
    rounds = []
    for r, score in enumerate(scores, start=1):
        site = {"val-auroc": score, "val-auprc": 0.0, "val-num-examples": 10} if score is not None else {}
        rounds.append(
            {"round": r, "sites": {"evaluate": {"h-1": site}}} | ({"failed": "halted"} if r == failed else {})
        )
    return rounds


def test_plateau_halves_the_rate_after_two_rounds_without_a_better_validation_score():
    rate = ServerSettings(learning_rate=0.01, lr_schedule="plateau").learning_rate_at
    assert rate(1, []) == 0.01
    assert rate(4, scored(0.6, 0.7, 0.8)) == 0.01  # still rising
    assert rate(5, scored(0.6, 0.7, 0.8, 0.75)) == 0.01  # one round below the best: wait
    assert rate(6, scored(0.6, 0.7, 0.8, 0.75, 0.8)) == 0.005  # a tie is no improvement: cut
    assert rate(7, scored(0.6, 0.7, 0.8, 0.75, 0.8, 0.79)) == 0.005  # the count starts again after a cut
    assert rate(8, scored(0.6, 0.7, 0.8, 0.75, 0.8, 0.79, 0.7)) == 0.0025
    assert rate(8, scored(0.6, 0.7, 0.8, 0.75, 0.8, 0.85, 0.7)) == 0.005  # a new best resets the count
    # A failed round and a round without validation metrics neither improve nor wait.
    assert rate(5, scored(0.8, 0.9, 0.7, None, failed=3)) == 0.01


def test_plateau_cuts_the_rate_the_sites_are_sent_and_each_round_records_its_rate(tmp_path):
    val_auroc = {1: 0.7, 2: 0.6, 3: 0.65, 4: 0.9, 5: 0.5}
    grid = FakeGrid([FakeSite(1, "h-1", val_auroc=val_auroc)])
    s = settings(tmp_path, rounds=5, learning_rate=0.02, lr_schedule="plateau", registered_sites=("h-1",))
    card = run(grid, s)
    sent = {
        m.content["config"]["server-round"]: m.content["config"]["learning_rate"]
        for m in grid.sent
        if m.metadata.message_type.startswith("train")
    }
    assert sent == {1: 0.02, 2: 0.02, 3: 0.02, 4: 0.01, 5: 0.01}  # rounds 2 and 3 below round 1's score
    assert [entry["learning_rate"] for entry in RunDirectory(s.run_dir).history()] == [0.02, 0.02, 0.02, 0.01, 0.01]
    assert card["training"]["lr_schedule"] == "plateau"
