"""Secure aggregation with Flower's SecAgg+, in process: the coordinator's round loop and the
sites' installed mods (``secaggplus_mod`` inside) exchange real Flower messages.

What is held here: the normalisation sums arrive exact, the securely aggregated model equals
plain FedAvg's within the stated quantisation bound, the strategy is never handed a single
site's update, a site that drops after the key exchange is recovered, and below the threshold
the round fails cleanly and the next goes on; strategies that need single updates are refused;
a site that requires secure aggregation cannot be made to send anything in the clear.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.audit import OutgoingMessageBlocked, check_outgoing
from client.secure_aggregation import SecureAggregationRefused, check_setup, make_secure_aggregation_mod
from hymate.data import MomentSums
from hymate.data.synthetic import SyntheticConfig, make_synthetic
from hymate.model import ModelOptions
from hymate.secure_sums import GRID_CLIPPING_RANGE, GRID_QUANTIZATION_RANGE, decode, encode
from hymate.settings_fields import RunConfigError
from server.federation import Federation
from server.run_dir import RunDirectory
from server.secure_aggregation import SecureAggregationSettings, error_bound
from server.settings import ServerSettings, SettingsError
from strategies.registry import NEEDS_SINGLE_UPDATES, WEIGHTED_SUM_STRATEGIES, StrategySpec, check_secure_aggregation
from tests.fake_grid import serverapp_identity
from tests.secure_sites import AppGrid, AppSite, local_data

COLLECT = Stage.COLLECT_MASKED_VECTORS


@pytest.fixture(scope="module")
def table():
    return make_synthetic(SyntheticConfig(seed=3, n_sites=4, stays_per_site=40, n_variables=5))


def sites(table, tmp_path, **node_config) -> list[AppSite]:
    return [
        AppSite(
            i + 1,
            local_data(table, f"site-{i}", f"hospital-{i + 1}", tmp_path / f"site{i + 1}"),
            node_config=dict(node_config),
        )
        for i in range(4)
    ]


def settings(tmp_path, **overrides) -> ServerSettings:
    values = dict(
        rounds=3,
        min_clients=2,
        run_dir=tmp_path / "run",
        round_timeout=0.5,  # a silent site costs a stage this long
        wait_for_clients=5.0,
        model=ModelOptions(d_model=8, n_mamba_layers=1, d_state=4, n_attention_layers=1, n_heads=2, dropout=0.0),
        secure_aggregation=SecureAggregationSettings(enabled=True),
    )
    return ServerSettings(**(values | overrides))


def weights_of(run_dir, r: int) -> np.ndarray:
    with np.load(run_dir / f"round-{r:03d}" / "weights.npz") as npz:
        return np.concatenate([npz[k].ravel() for k in sorted(npz.files)])


def fedavg(updates: dict[str, np.ndarray], examples: dict[str, int]) -> np.ndarray:
    names = sorted(updates)
    return np.average([updates[n].astype(np.float64) for n in names], axis=0, weights=[examples[n] for n in names])


class Recorder:
    """What the strategy's aggregate_train is handed, round by round."""

    def __init__(self, strategy):
        self.handed: dict[int, list[np.ndarray]] = {}
        inner = strategy.aggregate_train

        def aggregate_train(server_round, replies):
            replies = list(replies)
            self.handed[server_round] = [r.content["arrays"]["weights"].numpy().copy() for r in replies]
            return inner(server_round, replies)

        strategy.aggregate_train = aggregate_train


def test_a_secure_federation_sums_exactly_matches_fedavg_recovers_a_dropout_and_survives_a_failed_round(
    table, tmp_path
):
    group = sites(table, tmp_path)
    # Round 2: hospital-4 goes silent after the key exchange (recovered: 3 of 4 left, threshold 3).
    group[3].silent_at = {(2, COLLECT), (3, COLLECT)}
    # Round 3: hospital-3 goes silent as well: 2 left, below the threshold; round 4 goes on.
    group[2].silent_at = {(3, COLLECT)}
    grid = AppGrid(group, run_config={"secure-aggregation": True})
    s = settings(tmp_path, rounds=4)
    with serverapp_identity(run_id=7):
        federation = Federation(grid, s, run_id=7)
        recorder = Recorder(federation.strategy)
        card = federation.run()

    # The normaliser from the secure sums is the one from the plain sums, to float64 precision.
    plain = MomentSums.merge(*(MomentSums.from_table(site.data.train) for site in group)).to_normalizer()
    secure = RunDirectory(s.run_dir).read_facts().normalizer
    for name, array in plain.to_arrays().items():
        np.testing.assert_allclose(secure[name], array, rtol=1e-12, atol=1e-12)
    assert not any("moments" in m.content.array_records for m in grid.sent)

    examples = {site.name: len(site.data.train) for site in group}
    by_name = {site.name: site for site in group}
    contributors = {1: sorted(examples), 2: ["hospital-1", "hospital-2", "hospital-3"], 4: sorted(examples)}
    previous = {1: None, 2: 1, 4: 3}
    for r, names in contributors.items():
        weights = weights_of(s.run_dir, r)
        start = weights_of(s.run_dir, previous[r]) if previous[r] else None
        trained = {n: by_name[n].updates[r] for n in names}
        expected = fedavg(trained, {n: examples[n] for n in names})
        bound = error_bound(s.secure_aggregation, {n: examples[n] for n in names}) + 1e-6
        assert np.abs(weights - expected).max() <= bound, f"round {r}"
        if start is not None:
            assert np.abs(weights - start).max() > 100 * bound  # the model moved by far more than the error
        # The strategy was handed one reply per contributor, each the aggregate, never a site's own update.
        handed = recorder.handed[r]
        assert len(handed) == len(names)
        for vector in handed:
            np.testing.assert_allclose(vector, weights, atol=1e-6)
            for n in names:
                assert np.abs(vector - trained[n]).max() > 10 * bound
        m = json.loads((s.run_dir / f"round-{r:03d}" / "metrics.json").read_text())
        assert sorted(m["sites"]["train"]) == names
        assert m["sites"]["train"]["hospital-1"] == {"num-examples": examples["hospital-1"]}  # no per-site loss
        losses = {n: 0.5 + by_name[n].node_id / 10 for n in names}
        mean_loss = np.average([losses[n] for n in names], weights=[examples[n] for n in names])
        assert m["train"]["train_loss"] == pytest.approx(mean_loss, abs=1e-3)

    round_2 = json.loads((s.run_dir / "round-002" / "metrics.json").read_text())
    assert [(r["site"], r["cause"]) for r in round_2["rejected"]] == [("hospital-4", "silent")]
    assert "collect_masked_vectors" in round_2["rejected"][0]["reason"]
    round_3 = json.loads((s.run_dir / "round-003" / "metrics.json").read_text())
    assert "2 of 4 sites left, 3 needed to unmask" in round_3["failed"]
    np.testing.assert_array_equal(weights_of(s.run_dir, 3), weights_of(s.run_dir, 2))  # the model was kept
    events = [json.loads(line) for line in (s.run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["round"] for e in events if e["event"] == "round-failed"] == [3]
    assert card["training"]["secure_aggregation"]["reconstruction_threshold"] == 0.75
    assert [r["round"] for r in card["failed_rounds"]] == [3]
    assert "Secure aggregation: on" in (s.run_dir / "model_card.md").read_text()

    # What left the sites: no array in the clear, only SecAgg+ bytes in SecAgg+'s own record.
    for site in group:
        lines = [json.loads(x) for x in (site.data.settings.state_dir / "outgoing.jsonl").read_text().splitlines()]
        assert all(line["arrays"] == {} for line in lines)
        masked = [line for line in lines if line.get("stage") == COLLECT]
        assert masked and all(line["secure_aggregation"][Key.MASKED_PARAMETERS][0] == 2 for line in masked)


def test_central_dp_with_clipping_at_the_sites_runs_on_the_secure_sum(table, tmp_path):
    group = sites(table, tmp_path)
    for site in group:
        site.update_scale = 0.05  # an update norm of ~1.6 for this model, clipped to 0.5
    s = settings(
        tmp_path,
        rounds=1,
        strategy_name="dp-client-fixed",
        strategy_options="noise_multiplier=0.0 clipping_norm=0.5 num_sampled_clients=4",
    )
    with serverapp_identity(run_id=7):
        Federation(AppGrid(group), s, run_id=7).run()
    for site in group:  # each site clipped its own update
        assert np.linalg.norm(site.updates[1].astype(np.float64) - site.received[1]) == pytest.approx(0.5, rel=1e-5)
    examples = {site.name: len(site.data.train) for site in group}
    trained = {site.name: site.updates[1] for site in group}
    weights = weights_of(s.run_dir, 1)
    bound = error_bound(s.secure_aggregation, examples) + 1e-6
    assert np.abs(weights - fedavg(trained, examples)).max() <= bound


def test_the_exact_sum_encoding_survives_secaggs_quantisation():
    rng = np.random.default_rng(0)
    sites = [rng.choice([-1, 1], 40) * 10.0 ** rng.uniform(-6, 13, 40) for _ in range(5)]
    quantized = [quantize([encode(x)], GRID_CLIPPING_RANGE, GRID_QUANTIZATION_RANGE)[0] for x in sites]
    summed = dequantize([np.sum(quantized, axis=0)], GRID_CLIPPING_RANGE, GRID_QUANTIZATION_RANGE)[0]
    mean = (summed - (len(sites) - 1) * GRID_CLIPPING_RANGE) / len(sites)  # as SecAgg+ unmasks it
    np.testing.assert_allclose(decode(mean, len(sites)), np.sum(sites, axis=0), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("name", sorted(NEEDS_SINGLE_UPDATES))
def test_strategies_that_need_single_updates_are_refused_saying_why(name, tmp_path):
    with pytest.raises(SettingsError, match=f"strategy '{name}' cannot run under secure aggregation: .*weighted sum"):
        settings(tmp_path, strategy_name=name)


def test_weighted_sum_strategies_and_their_subclasses_run_under_secure_aggregation(tmp_path):
    for name in WEIGHTED_SUM_STRATEGIES:
        options = "noise_multiplier=0.1 clipping_norm=1.0" if name == "dp-client-fixed" else ""
        settings(tmp_path, strategy_name=name, strategy_options=options)
    check_secure_aggregation(StrategySpec("flwr.serverapp.strategy:FedAdam"))
    with pytest.raises(SettingsError, match="'fedmedian' cannot run"):
        settings(
            tmp_path,
            strategy_name="dp-client-fixed",
            strategy_options="base=fedmedian noise_multiplier=1 clipping_norm=1",
        )
    with pytest.raises(SettingsError, match="min-clients of at least 2"):
        settings(tmp_path, min_clients=1)
    with pytest.raises(RunConfigError, match="secagg-reconstruction-threshold must be in"):
        SecureAggregationSettings(enabled=True, reconstruction_threshold=0.5)


def _plain_train(node_config=None, run_config=None) -> tuple[Message, Context]:
    with serverapp_identity():
        message = Message(
            RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=3, message_type=MessageType.TRAIN
        )
    return message, Context(7, 3, node_config or {}, RecordDict(), run_config or {})


@pytest.mark.parametrize(
    ("node_config", "run_config"), [({"secure-aggregation": "true"}, {}), ({}, {"secure-aggregation": True})]
)
def test_a_site_that_requires_secure_aggregation_refuses_a_plain_training_request(node_config, run_config):
    mod = make_secure_aggregation_mod(lambda _: None)
    trained = []
    message, context = _plain_train(node_config, run_config)
    with pytest.raises(SecureAggregationRefused, match="plain one; refused"):
        mod(message, context, lambda m, c: trained.append(m))
    assert trained == []  # the handler never ran


def test_a_site_refuses_a_threshold_that_is_not_a_majority_of_the_shares():
    setup = {Key.SAMPLE_NUMBER: 4, Key.SHARE_NUMBER: 4}
    check_setup(ConfigRecord(setup | {Key.THRESHOLD: 3}))
    for threshold in (1, 2):
        with pytest.raises(SecureAggregationRefused, match="not a strict majority"):
            check_setup(ConfigRecord(setup | {Key.THRESHOLD: threshold}))
    with pytest.raises(SecureAggregationRefused, match="would reveal"):
        check_setup(ConfigRecord({Key.SAMPLE_NUMBER: 1, Key.SHARE_NUMBER: 1, Key.THRESHOLD: 1}))


def test_the_audit_lets_no_array_leave_a_site_that_requires_secure_aggregation():
    message, _ = _plain_train()
    weights = ArrayRecord({"weights": Array(np.zeros(3, np.float32))})
    message.content["arrays"] = weights
    reply = Message(RecordDict({"arrays": weights, "metrics": MetricRecord({"num-examples": 3})}), reply_to=message)
    check_outgoing(message, reply, frozenset())
    with pytest.raises(OutgoingMessageBlocked, match="only through secure aggregation"):
        check_outgoing(message, reply, frozenset(), masked_only=True)
    # SecAgg+ bytes pass only in SecAgg+'s own record of a SecAgg+ exchange.
    secure = Message(
        RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.PUBLIC_KEY_1: b"k", Key.PUBLIC_KEY_2: b"l"})}),
        reply_to=message,
    )
    line = check_outgoing(message, secure, frozenset(), masked_only=True, stage=Stage.SETUP)
    assert line["stage"] == Stage.SETUP and line["secure_aggregation"][Key.PUBLIC_KEY_1] == [1, 1]
    with pytest.raises(OutgoingMessageBlocked, match="raw bytes"):
        check_outgoing(message, secure, frozenset(), masked_only=True, stage=None)
