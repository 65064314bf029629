"""A hostile site cannot take another's name: real hymate-server and hymate-client processes
over TLS with SuperNode authentication on 127.0.0.1 (tests/deployment.py: site i's key is
registered as hospital-i)."""

from __future__ import annotations

import json

import pytest

from client.site import SiteSettings, open_site
from tests.deployment import Deployment, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

IMPOSTOR = "claims to be hospital-1 but its key is registered as hospital-2"


def test_a_site_started_with_another_sites_name_is_rejected_under_its_registered_name(tmp_path):
    d = Deployment(tmp_path, n_sites=2)
    try:
        # A round of local training can take minutes on two shared cores.
        server = d.start_server("--rounds", "1", "--min-clients", "1", "--round-timeout", "300")
        wait_until(lambda: "registered site hospital-2" in d.log("server.log"), 90, "the sites' keys to be registered")
        d.start_client(1)
        d.start_client(2, "--name", "hospital-1")  # hospital-2's key, hospital-1's name
        assert d.wait_server(server, 480) == 0, d.log("server.log")[-3000:]
    finally:
        d.stop()

    metrics = json.loads((d.run_dir / "round-001" / "metrics.json").read_text())
    own_train = len(open_site(SiteSettings(dataset="synthetic", site="site-0", state_dir=d.state_dir(1))).train)
    assert sorted(metrics["sites"]["train"]) == ["hospital-1"]
    assert metrics["sites"]["train"]["hospital-1"]["num-examples"] == own_train  # hospital-1's own update
    assert sorted(metrics["sites"]["evaluate"]) == ["hospital-1"]

    card = json.loads((d.run_dir / "model_card.json").read_text())
    assert [(r["site"], r["phase"], r["reason"]) for r in card["rejected_replies"]] == [
        ("hospital-2", "query", IMPOSTOR)
    ]
    assert [r["site"] for r in card["refused_nodes"]] == ["hospital-2"]
    assert card["normaliser_sites"] == ["hospital-1"]
    assert card["data_provenance"]["hospital-1"]["stays_train"] == own_train
    assert card["identity"] == {
        "authenticated": True,
        "sites": {"hospital-1": "registered key"},
        "note": "each site is named by the name its SuperNode key is registered under",
    }
    # The coordinator's console showed it as it happened.
    console = d.log("server.log")
    assert f"normalisation query: rejected hospital-2 (identity): {IMPOSTOR}" in console
    assert "round 1/1 done in" in console
