"""A site's identity is its key: the coordinator's round loop against an in-process fake grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

from hymate.model import ModelOptions
from server.federation import Federation, FederationError
from server.settings import ServerSettings
from server.site_identity import JOINED_LATE, NOT_IN_NORMALISER, UNNAMED_KEY, SiteIdentities
from tests.fake_grid import FakeGrid, FakeSite, serverapp_identity


def node(node_id: int, name: str, activated: str = "2026-01-01T00:00:00") -> NodeInfo:
    return NodeInfo(node_id=node_id, name=name, last_activated_at=activated)


def reply_claiming(name: str | None) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": 1})})
    if name is not None:
        content["site"] = ConfigRecord({"name": name})
    with serverapp_identity():
        return Message(content, dst_node_id=5, message_type="evaluate")


# -- SiteIdentities on its own ----------------------------------------------------------


def test_a_reply_claiming_another_sites_name_is_rejected_naming_both():
    ids = SiteIdentities()
    assert ids.observe([node(11, "hospital-1"), node(12, "hospital-2")]) == []
    assert ids.check(11, reply_claiming("hospital-1")) is None
    assert (
        ids.check(12, reply_claiming("hospital-1")) == "claims to be hospital-1 but its key is registered as hospital-2"
    )
    assert ids.name_of(12) == "hospital-2"
    assert ids.check(12, reply_claiming(None)) is None  # an error reply names no one: it is hospital-2's
    assert ids.identity_kinds() == {"hospital-1": "registered key", "hospital-2": "registered key"}


def test_the_later_of_two_nodes_with_one_registered_name_is_refused_for_the_run():
    ids = SiteIdentities()
    refused = ids.observe(
        [node(22, "hospital-1", "2026-01-01T10:05:00"), node(21, "hospital-1", "2026-01-01T10:00:00")]
    )
    assert [(r.node_id, r.site) for r in refused] == [(22, "hospital-1")]
    assert "a second node (node 22) with a key registered as hospital-1" in refused[0].reason
    assert "node 21 is hospital-1" in refused[0].reason
    assert not ids.admits(22) and ids.admits(21)
    # ... for the whole run, even once the first one is gone.
    assert ids.observe([node(22, "hospital-1", "2026-01-01T10:05:00")]) == []
    assert not ids.admits(22)
    assert ids.check(22, reply_claiming("hospital-1")) == refused[0].reason


def test_unauthenticated_names_come_from_the_first_reply_and_cannot_be_taken_twice():
    ids = SiteIdentities()
    assert ids.observe([node(31, ""), node(32, "")]) == []
    assert ids.check(31, reply_claiming("site-a")) is None
    reason = ids.check(32, reply_claiming("site-a"))
    assert reason.startswith("claims to be site-a, which node 31 already is in this run")
    assert ids.check(31, reply_claiming("site-b")) == "claims to be site-b but joined this run as site-a"
    assert ids.identity_kinds() == {"site-a": "self-reported (unauthenticated)"}
    # An unauthenticated site that restarts comes back as a new node: it may take its name back.
    ids.observe([node(33, "")])
    assert ids.check(33, reply_claiming("site-a")) is None and ids.name_of(33) == "site-a"


def test_once_the_normaliser_is_fixed_only_its_sites_take_part():
    ids = SiteIdentities()
    ids.observe([node(1, "hospital-1"), node(2, "hospital-2")])
    refused = ids.fix_members(["hospital-1"])
    assert [(r.site, r.reason) for r in refused] == [("hospital-2", NOT_IN_NORMALISER)]
    late = ids.observe([node(1, "hospital-1"), node(2, "hospital-2"), node(3, "hospital-3")])
    assert [(r.node_id, r.site, r.reason) for r in late] == [(3, "hospital-3", JOINED_LATE)]
    assert JOINED_LATE == "joined after the normalisation statistics were fixed; not part of this run"


def test_with_keys_a_node_registered_without_a_name_is_refused():
    ids = SiteIdentities()
    refused = ids.observe([node(1, "hospital-1"), node(2, "")])
    assert [(r.node_id, r.reason) for r in refused] == [(2, UNNAMED_KEY)]


# -- the round loop -------------------------------------------------------------------


def settings(tmp_path, **overrides) -> ServerSettings:
    values = dict(
        rounds=2,
        min_clients=1,
        run_dir=tmp_path / "run",
        round_timeout=5.0,
        wait_for_clients=5.0,
        model=ModelOptions(d_model=8, n_mamba_layers=1, d_state=4, n_attention_layers=1, n_heads=2, dropout=0.0),
    )
    return ServerSettings(**(values | overrides))


def run(grid: FakeGrid, s: ServerSettings) -> dict:
    with serverapp_identity(run_id=7):
        return Federation(grid, s, run_id=7).run()


def round_metrics(s: ServerSettings, r: int) -> dict:
    return json.loads((s.run_dir / f"round-{r:03d}" / "metrics.json").read_text())


def sent_to(grid: FakeGrid, node_id: int, kind: str) -> int:
    return sum(m.metadata.dst_node_id == node_id and m.metadata.message_type.startswith(kind) for m in grid.sent)


def test_a_site_posing_as_another_is_rejected_and_cannot_overwrite_its_metrics(tmp_path):
    grid = FakeGrid(
        [FakeSite(11, "hospital-1", examples=50), FakeSite(12, "hospital-2", claims="hospital-1", examples=80)]
    )
    s = settings(tmp_path, registered_sites=("hospital-1", "hospital-2"))
    card = run(grid, s)

    for r in (1, 2):
        m = round_metrics(s, r)
        assert m["sites"]["train"] == {
            "hospital-1": {"num-examples": 50, "train_loss": pytest.approx(0.61), "seconds": 1.0}
        }
        assert sorted(m["sites"]["evaluate"]) == ["hospital-1"]
    assert card["normaliser_sites"] == ["hospital-1"]
    assert card["rounds_by_site"] == {"hospital-1": [1, 2]}
    assert [(r["site"], r["phase"], r["cause"], r["reason"]) for r in card["rejected_replies"]] == [
        ("hospital-2", "query", "identity", "claims to be hospital-1 but its key is registered as hospital-2")
    ]
    assert [(r["site"], r["node_id"], r["reason"]) for r in card["refused_nodes"]] == [
        ("hospital-2", 12, NOT_IN_NORMALISER)
    ]
    assert sent_to(grid, 12, "train") == 0  # refused for the run: never sent the model, spends no budget
    assert card["identity"]["authenticated"] is True
    assert card["identity"]["sites"] == {"hospital-1": "registered key"}


def test_the_query_waits_for_every_registered_site(tmp_path):
    grid = FakeGrid([FakeSite(1, "hospital-1"), FakeSite(2, "hospital-2"), FakeSite(3, "hospital-3")])
    polls = {"n": 0}
    original = grid.get_nodes

    def hospital_3_connects_on_the_third_look():
        polls["n"] += 1
        return [n for n in original() if n.node_id != 3 or polls["n"] >= 3]

    grid.get_nodes = hospital_3_connects_on_the_third_look
    s = settings(tmp_path, rounds=1, registered_sites=("hospital-1", "hospital-2", "hospital-3"))
    card = run(grid, s)
    assert card["normaliser_sites"] == ["hospital-1", "hospital-2", "hospital-3"]
    assert polls["n"] >= 3
    events = [json.loads(line) for line in (s.run_dir / "events.jsonl").read_text().splitlines()]
    waiting = [e for e in events if e["event"] == "waiting"]
    assert waiting[0]["missing"] == ["hospital-3"] and waiting[0]["required"] == 3


def test_a_registered_site_that_never_connects_stops_the_query_with_its_name(tmp_path):
    grid = FakeGrid([FakeSite(1, "hospital-1")])
    s = settings(tmp_path, wait_for_clients=1.0, registered_sites=("hospital-1", "hospital-2"))
    with pytest.raises(FederationError, match="missing hospital-2 .*pass --min-connected"):
        run(grid, s)


def test_a_site_that_joins_after_the_normaliser_is_refused_for_the_run(tmp_path):
    grid = FakeGrid(
        [FakeSite(1, "hospital-1"), FakeSite(2, "hospital-2"), FakeSite(3, "hospital-3", joins_after_query=True)]
    )
    # The coordinator chose to start with two sites connected.
    s = settings(tmp_path, min_connected=2, registered_sites=("hospital-1", "hospital-2", "hospital-3"))
    card = run(grid, s)
    for r in (1, 2):
        m = round_metrics(s, r)
        assert sorted(m["sites"]["train"]) == ["hospital-1", "hospital-2"]
        assert [(x["site"], x["reason"]) for x in m["refused"]] == [("hospital-3", JOINED_LATE)]
    assert sent_to(grid, 3, "train") == 0 and sent_to(grid, 3, "evaluate") == 0
    assert card["normaliser_sites"] == ["hospital-1", "hospital-2"]
    assert sorted(card["data_provenance"]) == ["hospital-1", "hospital-2"]
    assert card["rounds_by_site"] == {"hospital-1": [1, 2], "hospital-2": [1, 2]}
    assert [(r["site"], r["reason"]) for r in card["refused_nodes"]] == [("hospital-3", JOINED_LATE)]
    md = (s.run_dir / "model_card.md").read_text()
    assert f"- hospital-3 (node 3): {JOINED_LATE}" in md


def test_a_dropout_is_reported_once_with_its_true_cause(tmp_path):
    grid = FakeGrid(
        [FakeSite(1, "hospital-1"), FakeSite(2, "hospital-2", gone_from_round=1), FakeSite(3, "hospital-3")]
    )
    grid.sites[2].silent_from_round = 2
    s = settings(tmp_path, registered_sites=("hospital-1", "hospital-2", "hospital-3"))
    run(grid, s)
    first, second = round_metrics(s, 1), round_metrics(s, 2)
    # hospital-2 was sent train and evaluate in round 1 and train in round 2: one report.
    assert sent_to(grid, 2, "train") == 2 and sent_to(grid, 2, "evaluate") == 1
    assert [(r["site"], r["phase"], r["cause"], r["reason"]) for r in first["rejected"]] == [
        ("hospital-2", "train", "offline", "site went offline before replying (its heartbeats stopped)")
    ]
    # hospital-3 falls silent in round 2: reported once, as silent.
    assert [(r["site"], r["phase"], r["cause"], r["reason"]) for r in second["rejected"]] == [
        ("hospital-3", "train", "silent", "no reply within 5 s")
    ]
    assert not any(
        "no reply" in r["reason"] and r["site"] == "hospital-2" for m in (first, second) for r in m["rejected"]
    )


def test_in_an_unauthenticated_run_names_are_reported_and_marked_so(tmp_path):
    grid = FakeGrid([FakeSite(1, claims="site-a"), FakeSite(2, claims="site-b")])
    s = settings(tmp_path, rounds=1)
    card = run(grid, s)
    assert sorted(round_metrics(s, 1)["sites"]["train"]) == ["site-a", "site-b"]
    assert card["identity"]["authenticated"] is False
    assert card["identity"]["sites"] == {
        "site-a": "self-reported (unauthenticated)",
        "site-b": "self-reported (unauthenticated)",
    }
    assert "not authenticated" in card["identity"]["note"]
    assert "self-reported (unauthenticated)" in (s.run_dir / "model_card.md").read_text()


def test_resume_keeps_the_normaliser_sites_under_new_node_ids(tmp_path):
    names = ("hospital-1", "hospital-2")
    s = settings(tmp_path, rounds=1, registered_sites=names)
    run(FakeGrid([FakeSite(1, "hospital-1"), FakeSite(2, "hospital-2")]), s)
    facts = json.loads((s.run_dir / "federation.json").read_text())["facts"]
    assert facts["identities"] == {"hospital-1": "registered key", "hospital-2": "registered key"}

    # A new SuperLink after a crash: new node ids; a third registered site shows up too.
    again = settings(tmp_path, rounds=2, resume=True, registered_sites=(*names, "hospital-3"))
    grid = FakeGrid([FakeSite(41, "hospital-1"), FakeSite(42, "hospital-2"), FakeSite(43, "hospital-3")])
    card = run(grid, again)
    m = round_metrics(again, 2)
    assert sorted(m["sites"]["train"]) == ["hospital-1", "hospital-2"]
    assert [(r["site"], r["reason"]) for r in m["refused"]] == [("hospital-3", JOINED_LATE)]
    assert card["rounds_by_site"] == {"hospital-1": [1, 2], "hospital-2": [1, 2]}
    assert sent_to(grid, 43, "query") == 0  # the normaliser is not asked again on resume


def test_the_train_replies_are_aggregated_from_the_registered_sites_only(tmp_path):
    grid = FakeGrid([FakeSite(1, "hospital-1"), FakeSite(2, "hospital-2")])
    s = settings(tmp_path, rounds=1, registered_sites=("hospital-1", "hospital-2"))
    run(grid, s)
    # The second node starts posing as hospital-1 only after the normaliser was built.
    grid.sites[1].claims = "hospital-1"
    again = settings(tmp_path, rounds=2, resume=True, registered_sites=("hospital-1", "hospital-2"))
    run(grid, again)
    m = round_metrics(again, 2)
    assert sorted(m["sites"]["train"]) == ["hospital-1"]
    assert m["sites"]["train"]["hospital-1"]["train_loss"] == pytest.approx(0.51)  # node 1's own, not node 2's
    assert {(r["site"], r["phase"], r["reason"]) for r in m["rejected"]} == {
        ("hospital-2", phase, "claims to be hospital-1 but its key is registered as hospital-2")
        for phase in ("train", "evaluate")
    }
    weights = np.load(again.run_dir / "round-002" / "weights.npz")
    assert all(np.isfinite(weights[k]).all() for k in weights.files)
