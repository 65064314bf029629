"""The hospital side without a network: plans, model checks, the outgoing audit, CLI errors."""

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from client import cli
from client.app import SiteFailure, reported_safely
from client.audit import OutgoingMessageBlocked, arrays_digest, check_outgoing
from client.local_norms import FILE_NAME, load_local_norms, save_local_norms
from client.site import SiteConfigError, SiteSettings, open_site
from client.training import (
    ModelMismatchError,
    build_model,
    class_weight,
    evaluate_locally,
    load_checked,
    train_locally,
    weights_of,
)
from hymate.data import DataError, MomentSums
from hymate.local_plan import LocalPlan, PlanError
from hymate.model import ModelOptions, normalisation_parameters
from hymate.train import positive_class_weight


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return open_site(SiteSettings(dataset="synthetic", site="site-1", state_dir=tmp_path_factory.mktemp("site")))


@pytest.fixture(scope="module")
def plan(site):
    return LocalPlan(
        ModelOptions(d_model=16, n_heads=2), MomentSums.from_table(site.train).to_normalizer(), batch_size=64
    )


def test_a_plan_survives_its_flat_record(plan):
    back = LocalPlan.from_record(plan.to_record())
    assert back.model == plan.model and back.local_epochs == plan.local_epochs
    sgd = dataclasses.replace(plan, optimizer="sgd", momentum=0.5)
    sgd_back = LocalPlan.from_record(sgd.to_record())
    assert (sgd_back.optimizer, sgd_back.momentum) == ("sgd", 0.5)
    np.testing.assert_array_equal(back.normalizer.value_std, plan.normalizer.value_std)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model.d_model": "64"}, "'model.d_model' must be int"),
        ({"learning_rate": float("inf")}, "must be finite"),
        ({"pos_weight": -3.0}, "pos_weight must be >= 0, got -3.0"),
    ],
)
def test_a_bad_plan_is_a_named_error(plan, change, message):
    record = plan.to_record() | change
    with pytest.raises(PlanError, match=message):
        LocalPlan.from_record(record)
    record = plan.to_record()
    del record["batch_size"]
    with pytest.raises(PlanError, match="missing 'batch_size'"):
        LocalPlan.from_record(record)


def test_the_positive_class_weight_is_the_plans_or_the_sites_own(site, plan):
    assert class_weight(dataclasses.replace(plan, pos_weight=2.5), site) == 2.5
    assert class_weight(plan, site) == positive_class_weight(site.train.labels) != 2.5
    assert LocalPlan.from_record(dataclasses.replace(plan, pos_weight=2.5).to_record()).pos_weight == 2.5


def test_received_weights_are_checked_before_they_are_loaded(site, plan):
    model = build_model(plan, site)
    good = weights_of(model)
    name = sorted(good)[0]
    for bad, message in [
        ({**good, name: good[name][..., None]}, "shape"),
        ({**good, name: good[name].astype(np.float64)}, "dtype"),
        ({**good, name: np.full_like(good[name], np.nan)}, "non-finite"),
        ({k: v for k, v in good.items() if k != name}, "missing"),
    ]:
        with pytest.raises(ModelMismatchError, match=message):
            load_checked(model, bad)


def test_local_training_moves_the_weights_and_evaluation_reports_metrics(site, plan):
    start = weights_of(build_model(plan, site))
    outcome = train_locally(plan, site, start, server_round=1)
    assert outcome.num_examples == len(site.train) and np.isfinite(outcome.train_loss)
    assert any(not np.array_equal(start[k], outcome.weights[k]) for k in start)
    metrics = evaluate_locally(plan, site, outcome.weights)
    assert metrics["num-examples"] == len(site.test)
    assert metrics["num-positives"] == int(site.test.labels.sum()) > 0
    assert 0.0 <= metrics["auroc"] <= 1.0 and metrics["loss"] > 0
    # The validation stays, for the coordinator's keep-round best: another split, its own count.
    assert metrics["val-num-examples"] == len(site.val) > 0
    assert 0.0 <= metrics["val-auroc"] <= 1.0 and metrics["val-loss"] > 0
    assert metrics["val-auroc"] != metrics["auroc"]


def test_fedbn_sites_keep_their_own_normalisation_layers(site, plan):
    fedbn = dataclasses.replace(plan, local_norms=True)
    start = weights_of(build_model(fedbn, site))
    norms = normalisation_parameters(build_model(fedbn, site))
    assert norms and all("norm" in name for name in norms)
    outcome = train_locally(fedbn, site, start, server_round=1)
    kept = np.load(site.settings.state_dir / FILE_NAME)
    assert sorted(kept.files) == sorted(norms)
    for name in norms:
        np.testing.assert_array_equal(kept[name], outcome.weights[name])
    # The next round arrives with the coordinator's (here: the initial) norms; the site's own win.
    model = build_model(fedbn, site)
    load_checked(model, start)
    assert load_local_norms(model, site.settings.state_dir)
    for name in norms:
        np.testing.assert_array_equal(model.state_dict()[name].numpy(), kept[name])
    # A plan without FedBN ignores the file: evaluation then differs from the FedBN evaluation.
    assert evaluate_locally(fedbn, site, start)["loss"] != evaluate_locally(plan, site, start)["loss"]
    (site.settings.state_dir / FILE_NAME).unlink()


def test_local_norms_of_another_model_are_a_named_error(site, plan, tmp_path):
    save_local_norms(build_model(plan, site), tmp_path)
    other = build_model(dataclasses.replace(plan, model=ModelOptions(d_model=16, n_heads=2, n_mamba_layers=1)), site)
    with pytest.raises(ValueError, match="different model"):
        load_local_norms(other, tmp_path)


def _message(content: RecordDict, kind: str, run_id: int = 1, group_id: str = "") -> Message:
    metadata = Metadata(
        run_id=run_id,
        message_id="m",
        src_node_id=1,
        dst_node_id=0,
        reply_to_message_id="",
        group_id=group_id,
        created_at=time.time(),
        ttl=60.0,
        message_type=kind,
    )
    return Message(metadata=metadata, content=content)


def test_the_audit_passes_updates_and_blocks_anything_else(site):
    sent = _message(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros((4, 2), np.float32))})}), "train")

    def reply(arrays=None, metrics=None, text=None) -> Message:
        content = {"metrics": MetricRecord({"num-examples": 5} | (metrics or {}))}
        if arrays is not None:
            content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        if text is not None:
            content["site"] = ConfigRecord(text)
        return _message(RecordDict(content), "train")

    ids = site.local_ids()
    line = check_outgoing(sent, reply({"w": np.ones((4, 2), np.float32)}, text={"name": "hospital-2"}), ids)
    assert line["arrays"] == {"arrays/w": ["float32", [4, 2]]} and line["text"] == {"site/name": "hospital-2"}
    a_patient = next(iter(site.train.patient_ids))
    for bad, message in [
        (reply({"values": site.train.values[:10]}), "neither a received parameter"),
        (reply({"w": np.ones((5, 2), np.float32)}), "neither a received parameter"),
        (reply(metrics={"risk": [0.1, 0.9]}), "per-record values"),
        (reply(text={"note": f"worst case was {a_patient}"}), "names a local stay or patient"),
    ]:
        with pytest.raises(OutgoingMessageBlocked, match=message):
            check_outgoing(sent, bad, ids)


def test_each_audit_line_names_its_run_round_and_the_hash_of_what_was_sent(site):
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    received = {"arrays": ArrayRecord({"w": Array(np.zeros((4, 2), np.float32)), "b": Array(np.zeros(3, np.float32))})}
    request = _message(RecordDict(received | {"config": ConfigRecord({"server-round": 7})}), "train", run_id=42)
    sent = {"w": w, "b": np.ones(3, np.float32)}
    content = {"arrays": ArrayRecord({k: Array(v) for k, v in sent.items()}), "metrics": MetricRecord({"n": 1})}
    line = check_outgoing(request, _message(RecordDict(content), "train", run_id=42), site.local_ids())
    assert line["run_id"] == 42 and line["round"] == 7
    # The hash is reproducible from the weights alone, whatever order they were sent in ...
    assert line["arrays_sha256"] == arrays_digest({"arrays/b": np.ones(3, np.float32), "arrays/w": w})
    assert len(line["arrays_sha256"]) == 64
    # ... and changes with any value, dtype or shape.
    for other in (
        {"arrays/w": w + 1, "arrays/b": np.ones(3, np.float32)},
        {"arrays/w": w.reshape(2, 4), "arrays/b": np.ones(3, np.float32)},
        {"arrays/w": w.astype(np.float64), "arrays/b": np.ones(3, np.float32)},
        {"arrays/v": w, "arrays/b": np.ones(3, np.float32)},
    ):
        assert arrays_digest(other) != line["arrays_sha256"]
    # Without a server-round the round comes from the message's group id; the query has neither.
    evaluate = _message(RecordDict(received), "evaluate", group_id="3")
    assert (
        check_outgoing(evaluate, _message(RecordDict({"metrics": MetricRecord({"n": 1})}), "evaluate"), set())["round"]
        == 3
    )
    query = check_outgoing(
        _message(RecordDict({"config": ConfigRecord({})}), "query"),
        _message(RecordDict({"metrics": MetricRecord({"n": 1})}), "query"),
        set(),
    )
    assert query["round"] is None and query["arrays_sha256"] is None


def test_local_data_errors_reach_the_coordinator_without_local_detail():
    @reported_safely
    def handler(msg, context):
        raise DataError("set-a/132539.txt line 7: non-numeric value 'abc'")

    with pytest.raises(SiteFailure) as caught:
        handler(None, None)
    assert "132539" not in str(caught.value) and "DataError" in str(caught.value)


def test_site_settings_name_the_missing_key():
    with pytest.raises(SiteConfigError, match="lacks 'state-dir'"):
        SiteSettings.from_node_config({"dataset": "synthetic"})
    with pytest.raises(SiteConfigError, match="'split-seed'='x' is not a valid int"):
        SiteSettings.from_node_config({"dataset": "synthetic", "state-dir": "/tmp/x", "split-seed": "x"})


def test_hymate_client_checks_its_data_before_connecting(tmp_path, capsys):
    args = [
        "--server",
        "127.0.0.1:1",
        "--dataset",
        "physionet2012",
        "--data",
        str(tmp_path / "nowhere"),
        "--state-dir",
        str(tmp_path / "state"),
        "--insecure",
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "hymate-client: error:" in err and "nowhere" in err
    assert not (tmp_path / "state" / "supernode.pid").exists()  # nothing was started


def test_hymate_client_wants_tls_material_unless_insecure(tmp_path, capsys):
    assert cli.main(["--server", "h:1", "--dataset", "synthetic", "--state-dir", str(tmp_path)]) == 2
    assert "--root-cert and --auth-key" in capsys.readouterr().err


def test_hymate_client_reads_a_config_file_and_flags_win(tmp_path):
    config = tmp_path / "site.toml"
    config.write_text('server = "coordinator:9093"\ndataset = "synthetic"\nsite = "site-0"\nstate-dir = "/var/x"\n')
    args = cli.build_parser().parse_args(["--config", str(config), "--site", "site-2"])
    options = cli.merged_options(args)
    assert options["server"] == "coordinator:9093" and options["site"] == "site-2"
    assert cli.site_config(options)["state-dir"] == str(Path("/var/x").resolve())
    config.write_text('colour = "blue"\n')
    with pytest.raises(SiteConfigError, match="unknown options \\['colour'\\]"):
        cli.merged_options(cli.build_parser().parse_args(["--config", str(config)]))
