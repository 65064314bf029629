"""End-to-end federations of real processes on 127.0.0.1: hymate-server and hymate-client
with TLS and SuperNode authentication, on the synthetic data.

Each test bounds every wait; together they run in a few minutes on two cores.
"""

from __future__ import annotations

import json
import signal
import textwrap
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from client.site import SiteSettings, open_site
from client.site_keys import write_site_key_pair
from client.supernode_errors import EXIT_REFUSED
from tests.deployment import BIN, ONE_FEDERATION_AT_A_TIME, Deployment, kill_group, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420), ONE_FEDERATION_AT_A_TIME]


@pytest.fixture
def deployment(tmp_path):
    d = Deployment(tmp_path)
    yield d
    d.stop()


def round_metrics(d: Deployment, r: int) -> dict:
    return json.loads((d.run_dir / f"round-{r:03d}" / "metrics.json").read_text())


def weights(d: Deployment, r: int) -> dict[str, np.ndarray]:
    with np.load(d.run_dir / f"round-{r:03d}" / "weights.npz") as npz:
        return {k: npz[k] for k in npz.files}


# Calibrated for 4 rounds, so hospital 1 can train round 2 twice (once before the crash, when the
# round started before the coordinator was killed, and again after the resume) within its budget.
ROOMY_BUDGET = ("--dp-epsilon", "50", "--dp-planned-rounds", "4")


def test_three_hospitals_over_tls_a_coordinator_crash_and_privacy_budgets(deployment):
    """Three hospitals train round 1 over TLS and send nothing but updates. Then the coordinator
    crashes and resumes; hospital 3 is gone for good; hospital 1 (DP, roomy budget) restarts
    between rounds and its spend continues from its ledger; hospital 2 (DP, budget for one
    round) refuses round 2 and says why. (One federation for both stories keeps the suite
    inside its time budget.)"""
    d = deployment
    server = d.start_server("--rounds", "2", "--min-clients", "1", "--min-connected", "3")
    wait_until(lambda: "registered site hospital-3" in d.log("server.log"), 90, "the SuperLink to register the sites")
    clients = {
        1: d.start_client(1, *ROOMY_BUDGET),
        2: d.start_client(2, "--dp-epsilon", "2", "--dp-planned-rounds", "1"),
        3: d.start_client(3),
    }
    wait_until(lambda: 1 in d.rounds_done(), 200, "round 1")

    # TLS is on: a plain-HTTP request is refused.
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{d.port}/health", timeout=5)

    kill_group(server)  # the coordinator crashes (SIGKILL) after round 1 ...
    kill_group(clients[3])  # ... hospital 3 goes away for good ...
    kill_group(clients[1], signal.SIGTERM)  # ... and hospital 1 restarts
    d.start_client(1, *ROOMY_BUDGET)
    restarted_at = time.time()
    # Hospital 2's SuperNode gives up on the dead coordinator and is restarted by hymate-client;
    # the resumed round waits for it (two sites connected) but closes with one reply.
    # (Under load hymate-client's restart backoff can take its SuperNode past the harness's 120 s.)
    server = d.start_server(
        "--rounds", "2", "--min-clients", "1", "--min-connected", "2", "--wait-for-clients", "240", resume=True
    )

    assert d.wait_server(server, 300) == 0, d.diagnosis()
    assert d.rounds_done() == [1, 2]
    first, second = round_metrics(d, 1), round_metrics(d, 2)
    assert [first["round"], second["round"]] == [1, 2]
    hospitals = ["hospital-1", "hospital-2", "hospital-3"]
    assert sorted(first["sites"]["train"]) == sorted(first["sites"]["evaluate"]) == hospitals
    assert first["rejected"] == []
    n = [first["sites"]["train"][s]["num-examples"] for s in hospitals]
    # The aggregated loss is the example-weighted mean of the three sites' losses.
    losses = [first["sites"]["train"][s]["train_loss"] for s in hospitals]
    assert first["train"]["train_loss"] == pytest.approx(np.average(losses, weights=n))
    assert 0.0 <= first["evaluate"]["auroc"] <= 1.0
    assert sorted(second["sites"]["train"]) == ["hospital-1"]
    # Round 1 was kept, not redone: the resumed run continued after it.
    assert (d.run_dir / "round-001" / "metrics.json").stat().st_mtime < restarted_at
    assert (d.run_dir / "round-002" / "metrics.json").stat().st_mtime > restarted_at
    before, after = weights(d, 1), weights(d, 2)
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[k], after[k]) for k in before), "the global model did not change"

    refusals = [r for r in second["rejected"] if r["site"] == "hospital-2"]
    assert (
        len(refusals) == 1 and "refused the round" in refusals[0]["reason"] and "privacy spend" in refusals[0]["reason"]
    )
    eps_1, eps_2 = first["privacy"]["hospital-1"]["dp-epsilon"], second["privacy"]["hospital-1"]["dp-epsilon"]
    assert 0 < eps_1 < eps_2 <= 50  # the restarted site continued its spend
    # Round 2 may have started before the crash: a site that trained it then spent budget on it,
    # and trains it again after the resume, so the ledger holds at least the two rounds.
    ledger = json.loads((d.state_dir(1) / "privacy" / "ledger.json").read_text())
    assert len(ledger["rounds"]) >= 2
    assert first["privacy"]["hospital-2"]["dp-epsilon"] <= 2.0
    assert "hospital-3" not in first["privacy"]  # no DP there

    card = json.loads((d.run_dir / "model_card.json").read_text())
    assert card["training"]["rounds_completed"] == 2
    assert sorted(card["data_provenance"]) == hospitals
    assert (d.run_dir / "model.pt").stat().st_size > 0
    assert card["privacy_spent_epsilon"]["hospital-1"] == pytest.approx(eps_2)
    assert sorted(card["final_evaluation"]["per_site"]) == ["hospital-1", "hospital-2"]

    # What each hospital sent, from its own audit log: arrays are the model's parameters or
    # moment sums, never shaped like its data, and no stay or patient id appears anywhere.
    parameter_shapes = {tuple(a.shape) for a in before.values()}
    for i, trained in ((1, 2), (2, 1), (3, 1)):  # at least: see the ledger above
        data = open_site(SiteSettings(dataset="synthetic", site=f"site-{i - 1}", state_dir=d.state_dir(i)))
        data_shapes = (
            {(len(t),) for t in (data.train, data.val, data.test)}
            | {(t.n_events,) for t in (data.train, data.val, data.test)}
            | {t.static.shape for t in (data.train, data.val, data.test)}
        )
        sent = [json.loads(line) for line in (d.state_dir(i) / "outgoing.jsonl").read_text().splitlines()]
        assert sum(1 for s in sent if s["type"] == "train" and s["arrays"]) >= trained
        for message in sent:
            for name, (_, shape) in message["arrays"].items():
                assert tuple(shape) not in data_shapes - parameter_shapes, f"{name} {shape} is shaped like local data"
            text = json.dumps(message)
            leaked = [x for x in data.local_ids() if f'"{x}"' in text]
            assert not leaked, f"local ids {leaked[:3]} left hospital-{i}"


POISON = textwrap.dedent(
    """
    # Loaded at interpreter start-up of one site's processes only (PYTHONPATH): like any
    # malicious site it skips our outgoing-message audit, and its "training" returns NaN
    # weights (HYMATE_POISON=nan) or a wrongly shaped tensor (HYMATE_POISON=shape).
    import os
    import numpy as np
    import client.audit as audit
    import client.training as training

    audit.check_outgoing = lambda request, reply, local_ids, **_: {}
    honest = training.train_locally

    def poisoned(plan, data, arrays, server_round, proximal_mu=0.0):
        outcome = honest(plan, data, arrays, server_round, proximal_mu)
        name = sorted(outcome.weights)[0]
        if os.environ["HYMATE_POISON"] == "nan":
            outcome.weights[name] = np.full_like(outcome.weights[name], np.nan)
        else:
            outcome.weights[name] = np.zeros(outcome.weights[name].shape + (2,), outcome.weights[name].dtype)
        return outcome

    training.train_locally = poisoned
    """
)


IMPOSTOR = "claims to be hospital-1 but its key is registered as hospital-4"


def test_hostile_sites_are_turned_away_and_the_round_goes_on(tmp_path):
    """One federation, every kind of hostile site at once (one deployment instead of three keeps
    the suite inside its time budget): hospital-2 and -3 send a wrongly shaped and a NaN update,
    hospital-4 claims hospital-1's name, and a stranger's key was never registered."""
    d = Deployment(tmp_path, n_sites=4)
    poison_dir = tmp_path / "poison"
    poison_dir.mkdir()
    (poison_dir / "sitecustomize.py").write_text(POISON)
    try:
        server = d.start_server("--rounds", "1", "--min-clients", "1", "--round-timeout", "300")
        wait_until(lambda: "registered site hospital-4" in d.log("server.log"), 90, "the sites' keys to be registered")
        d.start_client(1)
        d.start_client(2, env={"PYTHONPATH": str(poison_dir), "HYMATE_POISON": "shape"})
        d.start_client(3, env={"PYTHONPATH": str(poison_dir), "HYMATE_POISON": "nan"})
        d.start_client(4, "--name", "hospital-1")  # hospital-4's key, hospital-1's name
        write_site_key_pair(tmp_path / "stranger-key", "stranger")
        started = time.monotonic()
        # --max-restarts 0 bounds the stranger: an unregistered key would otherwise be retried.
        stranger = d._start(
            [
                BIN / "hymate-client",
                *("--server", f"127.0.0.1:{d.port}", "--dataset", "synthetic", "--site", "site-0"),
                *("--name", "hospital-1", "--state-dir", tmp_path / "stranger", "--root-cert", d.keys / "ca.crt"),
                *("--auth-key", tmp_path / "stranger-key" / "stranger", "--max-restarts", "0"),
            ],
            "stranger.log",
        )
        assert stranger.wait(120) == EXIT_REFUSED, d.log("stranger.log")
        assert time.monotonic() - started < 90
        assert d.wait_server(server, 330) == 0, d.diagnosis()
    finally:
        d.stop()

    # The stranger stopped at once, with the plain reason.
    assert "hymate-client: error: this site's key is not registered with the coordinator" in d.log("stranger.log")

    m = round_metrics(d, 1)
    own_train = len(open_site(SiteSettings(dataset="synthetic", site="site-0", state_dir=d.state_dir(1))).train)
    assert sorted(m["sites"]["train"]) == ["hospital-1"]
    assert m["sites"]["train"]["hospital-1"]["num-examples"] == own_train  # hospital-1's own update, no one else's
    reasons = {r["site"]: r["reason"] for r in m["rejected"] if r["phase"] == "train"}
    assert sorted(reasons) == ["hospital-2", "hospital-3"]
    assert "expected float32" in reasons["hospital-2"]
    assert "non-finite" in reasons["hospital-3"]
    assert all(np.isfinite(w).all() for w in weights(d, 1).values())

    card = json.loads((d.run_dir / "model_card.json").read_text())
    query_rejections = [(r["site"], r["reason"]) for r in card["rejected_replies"] if r["phase"] == "query"]
    assert query_rejections == [("hospital-4", IMPOSTOR)]
    assert [r["site"] for r in card["refused_nodes"]] == ["hospital-4"]
    assert card["normaliser_sites"] == ["hospital-1", "hospital-2", "hospital-3"]
    assert card["identity"]["authenticated"] is True
    assert card["identity"]["sites"]["hospital-1"] == "registered key"
    markdown = (d.run_dir / "model_card.md").read_text()
    assert "hospital-2 (train)" in markdown and "hospital-3 (train)" in markdown
    # The coordinator's console showed it as it happened.
    console = d.log("server.log")
    assert f"normalisation query: rejected hospital-4 (identity): {IMPOSTOR}" in console
    assert "round 1/1 done in" in console
