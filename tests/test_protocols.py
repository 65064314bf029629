"""Protocols without Ray: each virtual site's own split, one-class splits, and one scoring path."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import simulation.protocols as protocols
from hymate.data import DataError, StayRecord, table_from_stays
from hymate.train import TrainConfig
from simulation.evaluation import Predictions
from simulation.partitioners import PartitionScheme
from simulation.protocols import PROTOCOLS, Experiment, SimulationSpec, site_summary
from simulation.report import results_frame, write_report


def many_small_hospitals(n_hospitals: int = 90, patients_each: int = 2) -> object:
    """Like the eICU demo: many hospitals with a patient or two of each class."""
    stays = [
        StayRecord(f"s{h}-{i}", f"p{h}-{i}", f"hospital-{h}", int(i == 0), [], [0.5], [1], [float(i)])
        for h in range(n_hospitals)
        for i in range(patients_each)
    ]
    return table_from_stays("demo", ["x"], [], stays)


def experiment(monkeypatch, table, tmp_path: Path, **spec) -> Experiment:
    monkeypatch.setattr(protocols, "load_dataset", lambda *args, **kwargs: table)
    return Experiment(SimulationSpec(out=tmp_path / "out", bootstrap=5, **spec))


def two_iid_sites(monkeypatch, tmp_path: Path, **spec) -> Experiment:
    """Two iid virtual sites of 80 small-hospital stays, trained and scored on the CPU."""
    return experiment(
        monkeypatch,
        many_small_hospitals(40, 4),
        tmp_path,
        partition=PartitionScheme("iid"),
        sites=2,
        min_site_size=10,
        train=TrainConfig(device="cpu"),
        **spec,
    )


def test_virtual_sites_split_by_their_own_labels_not_their_source_hospitals(monkeypatch, tmp_path):
    # Stratified by source hospital (the old split), every stratum held one patient, so all
    # 90 positives went to train and val/test had none (the eICU demo's 106/0/0).
    exp = experiment(
        monkeypatch, many_small_hospitals(), tmp_path, partition=PartitionScheme("iid"), sites=2, min_site_size=10
    )
    for site in exp.sites.values():
        for part in (site.val, site.test):
            assert set(part.labels.tolist()) == {0, 1}
    summary = pd.DataFrame(site_summary(exp)).set_index("site")  # each split's own counts
    assert list(summary.index) == ["site-0", "site-1"]
    assert summary["train positives"].sum() + summary["val positives"].sum() + summary["test positives"].sum() == 90
    assert (summary["val positives"] >= 6).all() and (summary["test positives"] >= 6).all()
    assert (summary["warning"] == "").all() and exp.result.warnings == []


def one_positive_per_site(n_sites: int = 2, patients_each: int = 30) -> object:
    stays = [
        StayRecord(f"s{h}-{i}", f"p{h}-{i}", f"ward-{h}", int(i == 0), [], [0.5], [1], [1.0])
        for h in range(n_sites)
        for i in range(patients_each)
    ]
    return table_from_stays("wards", ["x"], [], stays)


def test_a_split_without_both_classes_is_an_error_when_asked_naming_site_counts_and_remedy(monkeypatch, tmp_path):
    with pytest.raises(DataError) as error:
        experiment(monkeypatch, one_positive_per_site(), tmp_path, require_both_classes=True)
    message = str(error.value)
    assert "site 'ward-0' has no positive patient in its val split (0 positive and 5 negative patients there" in message
    assert "the site has 1 positives of 30 patients" in message
    assert "use another partition (e.g. --partition iid --sites 2)" in message
    assert "or leave out --require-both-classes to run anyway" in message
    with pytest.raises(DataError, match="use fewer --sites, a larger ALPHA or another --partition"):
        experiment(
            monkeypatch,
            one_positive_per_site(),
            tmp_path,
            partition=PartitionScheme("iid"),
            sites=2,
            require_both_classes=True,
        )


class FakeBundle:
    normalizer = "normalizer"

    def build(self) -> str:
        return "model"


@pytest.fixture
def scored(monkeypatch):
    """Every protocol's training replaced by stand-ins; records each scoring call's device."""
    calls: list[dict] = []

    def fake_predict(model, normalizer, table, max_events, device="auto"):
        calls.append({"model": model, "device": device, "n": len(table)})
        return Predictions(table.labels.astype(np.float32), np.linspace(0.1, 0.9, len(table)))

    def fake_federate(self, seed, names, label, local_norms=False):
        self.result.federated_runs[label] = Path("unused")
        return FakeBundle()

    monkeypatch.setattr(protocols, "predict", fake_predict)
    monkeypatch.setattr(Experiment, "_federate", fake_federate)
    monkeypatch.setattr(
        protocols, "train_centralized", lambda *a, **k: SimpleNamespace(model="model", normalizer="normalizer")
    )
    monkeypatch.setattr(protocols, "variable_importance", lambda model, normalizer, table, n: np.ones(1))
    monkeypatch.setattr(protocols, "make_loader_for", lambda *a, **k: None)
    monkeypatch.setattr(protocols, "fit", lambda *a, **k: None)
    monkeypatch.setattr(protocols, "load_local_norms", lambda model, path: True)
    return calls


def test_loso_scores_on_the_requested_device(monkeypatch, tmp_path, scored):
    table = many_small_hospitals(40, 4)
    exp = experiment(
        monkeypatch,
        table,
        tmp_path,
        partition=PartitionScheme("iid"),
        sites=3,
        min_site_size=10,
        protocols=("loso",),
        train=TrainConfig(device="cpu"),
    )
    exp.run()
    assert [c["device"] for c in scored] == ["cpu", "cpu", "cpu"]  # once per held-out site
    assert {r["test_site"] for r in exp.result.rows} == {"site-0", "site-1", "site-2"}


def test_every_protocol_scores_through_the_one_helper(monkeypatch, tmp_path, scored):
    exp = two_iid_sites(monkeypatch, tmp_path, protocols=PROTOCOLS)
    helper_calls: list[str] = []
    score = Experiment._score

    def spy(self, *args, **keys):
        helper_calls.append(keys["protocol"])
        return score(self, *args, **keys)

    monkeypatch.setattr(Experiment, "_score", spy)
    exp.run()
    assert {r["protocol"] for r in exp.result.rows} == set(PROTOCOLS)
    # Each metric row came through the helper, and every prediction used the requested device.
    assert len(exp.result.rows) == 4 * len(helper_calls) == 4 * len(scored)
    assert {c["device"] for c in scored} == {"cpu"}


@pytest.mark.parametrize("class_weight, expected", [("none", 1.0), ("federation", None), ("site", None)])
def test_class_weight_none_trains_every_non_federated_protocol_unweighted(
    monkeypatch, tmp_path, scored, class_weight, expected
):
    """None: centralized and local training derive sqrt(negatives / positives) from their labels."""
    weights: dict[str, list] = {"train_centralized": [], "fit": []}
    monkeypatch.setattr(
        protocols,
        "train_centralized",
        lambda train, val, tests, model, config, init_from: (
            weights["train_centralized"].append(config.pos_weight)
            or SimpleNamespace(model="model", normalizer="normalizer")
        ),
    )
    monkeypatch.setattr(
        protocols, "fit", lambda model, train, val, config, pos_weight: weights["fit"].append(pos_weight)
    )
    exp = two_iid_sites(
        monkeypatch, tmp_path, protocols=("centralized", "local", "personalized"), class_weight=class_weight
    )
    exp.run()
    assert weights["train_centralized"] == [expected] * 3  # centralized, then each of the 2 sites' own
    assert len(weights["fit"]) == 2  # personalised: each site fine-tunes the federated model
    if expected is None:  # each site's own labels
        assert all(w > 1.0 for w in weights["fit"])
    else:
        assert weights["fit"] == [expected, expected]


def test_one_class_splits_are_by_default_flagged_in_results_and_report(monkeypatch, tmp_path, scored):
    exp = experiment(monkeypatch, one_positive_per_site(), tmp_path, protocols=("federated",))
    assert len(exp.result.warnings) == 4  # val and test of both wards
    exp.run()
    results = results_frame(exp.result.rows)
    flagged = results[results["warning"] != ""]
    assert set(flagged["test_site"]) == {"ward-0", "ward-1"}
    assert flagged["warning"].str.contains("in its test split").all()
    assert (results.loc[results["test_site"] == "pooled", "warning"] == "").all()
    sites = pd.DataFrame(site_summary(exp))
    assert sites["warning"].str.contains("in its val split").all()
    report = write_report(
        tmp_path / "report", "t", {}, results, sites, {}, {"x": 1.0}, warnings=exp.result.warnings
    ).read_text()
    assert "## Warnings: splits without both classes" in report
    assert report.count("- **warning**: wards: site 'ward-") == 4
    written = pd.read_csv(tmp_path / "report" / "results.csv", keep_default_na=False)
    assert (written.loc[written["test_site"] == "ward-0", "warning"] != "").all()
