"""One positive class weight for a whole federation: the one the centralized model uses, from
the sites' training label counts, so that FedAvg minimises the same objective; each site's own
on request, or when a member did not report its count."""

from __future__ import annotations

import math

import numpy as np
import pytest

from client.site import SiteSettings, open_site
from hymate.model_bundle import ModelBundle
from hymate.train import positive_class_weight
from server.run_dir import RunDirectory
from tests.fake_grid import FakeGrid, FakeSite
from tests.test_site_identity import run, settings


def sent_weights(grid: FakeGrid) -> set[tuple[str, float]]:
    return {
        (m.metadata.message_type.split(".")[0], m.content["config"]["pos_weight"])
        for m in grid.sent
        if m.metadata.message_type != "query"
    }


def test_every_site_trains_and_evaluates_with_the_federations_weight(tmp_path):
    # 5 + 45 positives among 50 + 150 training stays: sqrt(150 / 50) for everyone, where the sites'
    # own weights would be sqrt(45 / 5) = 3 and sqrt(105 / 45) = 1.53.
    grid = FakeGrid(
        [FakeSite(1, "h-1", examples=50, positives_train=5), FakeSite(2, "h-2", examples=150, positives_train=45)]
    )
    card = run(grid, settings(tmp_path, rounds=2, registered_sites=("h-1", "h-2")))
    assert card["training"]["positive_class_weight"] == pytest.approx(math.sqrt(3))
    assert {kind for kind, _ in sent_weights(grid)} == {"train", "evaluate"}
    assert [weight for _, weight in sent_weights(grid)] == [pytest.approx(math.sqrt(3))] * 2


@pytest.mark.parametrize("reported, class_weight", [((5, 45), "site"), ((5, None), "federation")])
def test_each_site_keeps_its_own_weight_on_request_or_without_every_count(tmp_path, reported, class_weight):
    sites = [FakeSite(i + 1, f"h-{i}", examples=100, positives_train=k) for i, k in enumerate(reported)]
    grid = FakeGrid(sites)
    run(grid, settings(tmp_path, rounds=1, class_weight=class_weight, registered_sites=("h-0", "h-1")))
    assert sent_weights(grid) == {("train", 0.0), ("evaluate", 0.0)}  # 0: the site's own


def test_class_weight_none_has_every_site_train_and_evaluate_unweighted(tmp_path):
    grid = FakeGrid([FakeSite(i + 1, f"h-{i}", examples=100, positives_train=k) for i, k in enumerate((5, 45))])
    card = run(grid, settings(tmp_path, rounds=1, class_weight="none", registered_sites=("h-0", "h-1")))
    assert sent_weights(grid) == {("train", 1.0), ("evaluate", 1.0)}
    assert card["training"]["positive_class_weight"] == 1.0


def test_a_site_reports_its_training_positives_as_a_count_only(tmp_path):
    site = open_site(SiteSettings(dataset="synthetic", site="site-2", state_dir=tmp_path))
    provenance = site.provenance()
    assert provenance["positives_train"] == int(site.train.labels.sum()) > 0
    assert positive_class_weight(site.train.labels) == pytest.approx(
        math.sqrt((provenance["stays_train"] - provenance["positives_train"]) / provenance["positives_train"])
    )


def _saved_and_kept(s) -> tuple[dict, dict]:
    run_dir = RunDirectory(s.run_dir)
    kept = run_dir.read_round(1).weights
    return {k: v.numpy() for k, v in ModelBundle.load(run_dir.model_file).state_dict.items()}, kept


@pytest.mark.parametrize(
    "class_weight, removed",
    [
        ("federation", math.sqrt(3)),  # 50 positives among 200 training stays
        ("site", math.exp((50 * math.log(3) + 150 * math.log(math.sqrt(105 / 45))) / 200)),  # the sites' own
        ("none", 1.0),
    ],
)
def test_the_saved_model_predicts_probabilities_the_weight_taken_out_of_its_head(tmp_path, class_weight, removed):
    grid = FakeGrid(
        [FakeSite(1, "h-1", examples=50, positives_train=5), FakeSite(2, "h-2", examples=150, positives_train=45)]
    )
    s = settings(tmp_path, rounds=1, class_weight=class_weight, registered_sites=("h-1", "h-2"))
    card = run(grid, s)
    saved, kept = _saved_and_kept(s)
    assert saved.keys() == kept.keys()
    for name, value in kept.items():
        shift = math.log(removed) if name == "head.bias" else 0.0
        np.testing.assert_allclose(saved[name], value - shift, rtol=1e-6, atol=1e-7, err_msg=name)
    assert card["training"]["class_weight_removed_from_risks"] == pytest.approx(removed)
    assert "Risks: probabilities" in (s.run_dir / "model_card.md").read_text()


def test_without_every_sites_counts_the_card_says_the_risks_keep_the_offset(tmp_path):
    grid = FakeGrid([FakeSite(1, "h-1", examples=50, positives_train=5), FakeSite(2, "h-2", examples=150)])
    s = settings(tmp_path, rounds=1, registered_sites=("h-1", "h-2"))
    card = run(grid, s)
    saved, kept = _saved_and_kept(s)
    assert all(np.array_equal(saved[k], v) for k, v in kept.items())
    assert card["training"]["class_weight_removed_from_risks"] is None
    assert "keep their offset" in (s.run_dir / "model_card.md").read_text()
