"""A secure-aggregation federation of real processes on 127.0.0.1: hymate-server and three
hymate-client with TLS, SuperNode authentication and ``--secure-aggregation`` on both sides.

One federation covers the issue's cases in three rounds: round 1, all three train; round 2,
hospitals 2 and 3 fail after the key exchange (1 of 3 left, threshold 2), the round fails cleanly
with its reason and the model is kept; round 3 goes on, and hospital-3 goes silent after the key
exchange and is recovered (2 of 3 left). Test
hooks (``sitecustomize`` on PYTHONPATH, as in test_federation_deployment) record what each site
trained and what the coordinator's strategy was handed, so both can be compared.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from server.secure_aggregation import SecureAggregationSettings, error_bound
from tests.deployment import ONE_FEDERATION_AT_A_TIME, Deployment, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480), ONE_FEDERATION_AT_A_TIME]

# Seconds per SecAgg+ stage: over 3x the slowest stage measured here (a site's local training, 6 s
# with three sites on two cores). The silent round waits this long for nothing.
STAGE_TIMEOUT = 25
SILENCE = STAGE_TIMEOUT + 5  # hospital-3 sleeps this long in round 3: past the timeout, back for the evaluation

SITE_HOOK = textwrap.dedent(
    """
    # Loaded at start-up of one site's processes (PYTHONPATH): saves what the site trained, and
    # drops out after the key exchange when told to (HYMATE_SILENT_ROUNDS: sleep past the
    # coordinator's timeout; HYMATE_FAIL_ROUNDS: the training crashes).
    import os, time
    import numpy as np
    import client.training as training
    from hymate.weight_vector import to_vector

    honest = training.train_locally

    def recorded(plan, data, arrays, server_round, proximal_mu=0.0):
        outcome = honest(plan, data, arrays, server_round, proximal_mu)
        np.save(data.settings.state_dir / f"trained-{server_round}.npy", to_vector(outcome.weights))
        if str(server_round) in os.environ.get("HYMATE_FAIL_ROUNDS", "").split(","):
            raise RuntimeError("simulated crash after the key exchange")
        if str(server_round) in os.environ.get("HYMATE_SILENT_ROUNDS", "").split(","):
            time.sleep(float(os.environ["HYMATE_SILENCE"]))
        return outcome

    training.train_locally = recorded
    """
)

SERVER_HOOK = textwrap.dedent(
    """
    # Loaded at start-up of the coordinator's processes: records every model the strategy is handed.
    import os
    import numpy as np
    from flwr.serverapp.strategy import FedAvg

    inner = FedAvg.aggregate_train

    def recording(self, server_round, replies):
        replies = list(replies)
        for k, reply in enumerate(replies):
            vector = reply.content["arrays"]["weights"].numpy()
            np.save(os.path.join(os.environ["HYMATE_RECORD_DIR"], f"handed-{server_round}-{k}.npy"), vector)
        return inner(self, server_round, replies)

    FedAvg.aggregate_train = recording
    """
)


def weights(d: Deployment, r: int) -> np.ndarray:
    with np.load(d.run_dir / f"round-{r:03d}" / "weights.npz") as npz:
        return np.concatenate([npz[k].ravel() for k in sorted(npz.files)])


def metrics(d: Deployment, r: int) -> dict:
    return json.loads((d.run_dir / f"round-{r:03d}" / "metrics.json").read_text())


def test_secure_aggregation_matches_fedavg_recovers_a_dropout_and_fails_a_round_cleanly(tmp_path):
    d = Deployment(tmp_path, n_sites=3)
    hooks = {"site": tmp_path / "site-hook", "server": tmp_path / "server-hook", "record": tmp_path / "handed"}
    for name, text in (("site", SITE_HOOK), ("server", SERVER_HOOK)):
        hooks[name].mkdir()
        (hooks[name] / "sitecustomize.py").write_text(text)
    hooks["record"].mkdir()
    drops = {3: {"HYMATE_FAIL_ROUNDS": "2", "HYMATE_SILENT_ROUNDS": "3"}, 2: {"HYMATE_FAIL_ROUNDS": "2"}}
    try:
        server = d.start_server(
            *("--rounds", "3", "--min-clients", "2", "--secure-aggregation"),
            *("--round-timeout", str(STAGE_TIMEOUT), "--max-events", "100"),
            env={"PYTHONPATH": str(hooks["server"]), "HYMATE_RECORD_DIR": str(hooks["record"])},
        )
        wait_until(lambda: "registered site hospital-3" in d.log("server.log"), 90, "the sites' keys to be registered")
        for i in (1, 2, 3):
            env = {"PYTHONPATH": str(hooks["site"]), "HYMATE_SILENCE": str(SILENCE)} | drops.get(i, {})
            d.start_client(i, "--secure-aggregation", env=env)
        assert d.wait_server(server, 420) == 0, d.diagnosis()
    finally:
        d.stop()

    assert d.rounds_done() == [1, 2, 3]
    names = [d.site_name(i) for i in (1, 2, 3)]
    trained = {(i, r): np.load(d.state_dir(i) / f"trained-{r}.npy") for i in (1, 2, 3) for r in (1, 3)}
    for r, contributors in ((1, (1, 2, 3)), (3, (1, 2))):
        m = metrics(d, r)
        assert sorted(m["sites"]["train"]) == [names[i - 1] for i in contributors]
        examples = {i: m["sites"]["train"][names[i - 1]]["num-examples"] for i in contributors}
        fedavg = np.average(
            [trained[i, r].astype(np.float64) for i in contributors], axis=0, weights=list(examples.values())
        )
        bound = error_bound(SecureAggregationSettings(), examples) + 1e-6
        aggregate = weights(d, r)
        assert np.abs(aggregate - fedavg).max() <= bound, f"round {r}"
        # The strategy was handed one reply per contributor, each the aggregate, never one site's update.
        handed = [np.load(p) for p in sorted(hooks["record"].glob(f"handed-{r}-*.npy"))]
        assert len(handed) == len(contributors)
        for vector in handed:
            np.testing.assert_allclose(vector, aggregate, atol=1e-6)
            assert all(np.abs(vector - trained[i, r]).max() > 10 * bound for i in contributors)
    silent = [(x["site"], x["cause"]) for x in metrics(d, 3)["rejected"] if x["phase"] == "train"]
    assert silent == [("hospital-3", "silent")]

    failed = metrics(d, 2)
    assert "1 of 3 sites left, 2 needed to unmask" in failed["failed"]
    reasons = {x["site"]: x["reason"] for x in failed["rejected"]}
    assert sorted(reasons) == ["hospital-2", "hospital-3"]
    assert all("site-side failure (RuntimeError)" in reason for reason in reasons.values())
    np.testing.assert_array_equal(weights(d, 2), weights(d, 1))
    assert "round 2/3 failed, the model is kept: secure aggregation halted" in d.log("server.log")
    assert not list(hooks["record"].glob("handed-2-*.npy"))  # the strategy saw nothing of round 2

    card = json.loads((d.run_dir / "model_card.json").read_text())
    assert card["training"]["secure_aggregation"]["clipping_range"] == 4.0
    assert [r["round"] for r in card["failed_rounds"]] == [2]
    assert sorted(card["normaliser_sites"]) == names
    # Nothing left any site in the clear: no arrays, SecAgg+ bytes only in its own record.
    for i in (1, 2, 3):
        sent = [json.loads(line) for line in (d.state_dir(i) / "outgoing.jsonl").read_text().splitlines()]
        assert sent and all(line["arrays"] == {} for line in sent)
        assert any(line.get("stage") == "collect_masked_vectors" for line in sent)
