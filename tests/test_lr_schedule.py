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
    with pytest.raises(RunConfigError, match="lr-schedule must be one of constant, cosine, got 'step'"):
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


def test_each_round_records_the_rate_its_sites_trained_at(tmp_path):
    s = settings(tmp_path, rounds=3, learning_rate=0.02, lr_schedule="cosine", registered_sites=("h-1",))
    run(FakeGrid([FakeSite(1, "h-1")]), s)
    recorded = [entry["learning_rate"] for entry in RunDirectory(s.run_dir).history()]
    assert recorded == pytest.approx([s.learning_rate_at(r) for r in (1, 2, 3)])
    assert recorded[0] > recorded[1] > recorded[2]
