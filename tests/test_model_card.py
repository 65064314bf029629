"""The model card: every field a reader needs to trust the model, checked by value."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from datetime import UTC, datetime, timedelta

import pytest

from server.label_definitions import LABEL_DEFINITIONS, label_definition
from server.metric_intervals import UNAVAILABLE, hanley_mcneil, logit_interval, site_intervals
from tests.fake_grid import FakeGrid, FakeSite
from tests.test_site_identity import run, settings


@pytest.fixture(scope="module")
def card_and_settings(tmp_path_factory):
    s = settings(
        tmp_path_factory.mktemp("card"),
        rounds=2,
        local_epochs=3,
        batch_size=16,
        learning_rate=0.003,
        seed=11,
        registered_sites=("hospital-1", "hospital-2"),
    )
    grid = FakeGrid([FakeSite(1, "hospital-1", positives=10), FakeSite(2, "hospital-2", positives=None)])
    started = datetime.now(UTC)
    return run(grid, s), s, started


def test_the_card_names_the_run_its_date_and_the_software(card_and_settings):
    card, _, started = card_and_settings
    assert card["run"]["id"] == 7
    date = datetime.fromisoformat(card["run"]["date"])
    assert started - timedelta(seconds=1) <= date <= datetime.now(UTC)
    assert card["run"]["software"] == {
        p: importlib.metadata.version(p) for p in ("hymate-fl", "flwr", "torch", "opacus")
    }


def test_the_card_holds_the_sha256_of_the_saved_model(card_and_settings):
    card, s, _ = card_and_settings
    assert card["run"]["model_sha256"] == hashlib.sha256((s.run_dir / "model.pt").read_bytes()).hexdigest()
    on_disk = json.loads((s.run_dir / "model_card.json").read_text())
    assert on_disk["run"]["model_sha256"] == card["run"]["model_sha256"]
    assert card["run"]["model_sha256"] in (s.run_dir / "model_card.md").read_text()


def test_the_card_holds_the_training_settings_and_the_label(card_and_settings):
    card, _, _ = card_and_settings
    t = card["training"]
    assert (t["local_epochs"], t["batch_size"], t["learning_rate"], t["seed"]) == (3, 16, 0.003, 11)
    assert (t["model"].d_model, t["model"].n_heads) == (8, 2)
    assert card["task"]["label"] == LABEL_DEFINITIONS["synthetic"]
    assert card["task"]["label"].startswith("planted signal")
    md = json.loads(json.dumps(card, default=str))  # serialisable
    assert md["task"]["dataset"] == "synthetic"


def test_per_site_intervals_are_hanley_mcneil_or_say_why_not(card_and_settings):
    card, s, _ = card_and_settings
    ci = card["final_evaluation"]["per_site_95ci"]
    # hospital-1: AUROC 0.8 on 40 stays, 10 positive; AUPRC 0.5 (worked by hand, see below).
    assert ci["hospital-1"]["auroc"] == pytest.approx([0.6224, 0.9776], abs=1e-4)
    assert ci["hospital-1"]["auprc"] == pytest.approx([0.2245, 0.7755], abs=1e-4)
    assert ci["hospital-2"] == {"auroc": UNAVAILABLE, "auprc": UNAVAILABLE}
    md = (s.run_dir / "model_card.md").read_text()
    assert "| hospital-1 | 40 | 0.8000 (0.622-0.978) | 0.5000 (0.225-0.775) | 0.4000 |" in md
    assert f"| hospital-2 | 40 | 0.8000 ({UNAVAILABLE})" in md


def test_closed_form_intervals_by_hand():
    # Hanley-McNeil, A=0.8, 10 positives, 30 negatives: Q1 = 0.8/1.2, Q2 = 1.28/1.8,
    # var = (0.16 + 9 (Q1 - 0.64) + 29 (Q2 - 0.64)) / 300 = 0.0082074, se = 0.090595.
    lo, hi = hanley_mcneil(0.8, 10, 30)
    assert (lo, hi) == pytest.approx((0.8 - 1.96 * 0.090595, 0.8 + 1.96 * 0.090595), abs=1e-4)
    # Logit interval, AP=0.5 with 10 positives: tau = 1/sqrt(2.5); expit(+-1.96 tau).
    assert logit_interval(0.5, 10) == pytest.approx((0.22453, 0.77547), abs=1e-4)
    assert site_intervals({"num-examples": 10, "num-positives": 0, "auroc": 0.5})["auroc"].startswith(
        "interval unavailable: the site's test stays hold one class only"
    )
    assert site_intervals({"num-examples": 10, "num-positives": 3, "auroc": float("nan")})["auroc"].startswith(
        "interval unavailable: metric undefined"
    )


def test_every_dataset_has_a_label_definition():
    assert set(LABEL_DEFINITIONS) == {"synthetic", "physionet2012", "physionet2019", "eicu", "mimic4"}
    assert "In-hospital_death" in label_definition("physionet2012")
    assert "after the first 24 ICU hours" in label_definition("physionet2019")
    assert label_definition("other") == "not documented for dataset 'other'"


def test_which_sites_shaped_the_model(card_and_settings):
    card, _, _ = card_and_settings
    assert card["normaliser_sites"] == ["hospital-1", "hospital-2"]
    assert card["rounds_by_site"] == {"hospital-1": [1, 2], "hospital-2": [1, 2]}
    assert card["identity"]["authenticated"] is True
