"""The run's event stream and the coordinator's console built on it."""

from __future__ import annotations

import json

from server.events import ConsoleProgress, EventLog, EventTail, describe
from server.site_identity import NOT_IN_NORMALISER
from tests.fake_grid import FakeGrid, FakeSite
from tests.test_site_identity import run, settings


def test_a_tail_returns_each_complete_event_once_and_only_new_ones(tmp_path):
    path = tmp_path / "events.jsonl"
    EventLog(path).emit("round-started", round=1, rounds=2)  # an earlier run's event
    tail = EventTail(path)
    assert tail.new_events() == []
    log = EventLog(path)
    log.emit("round-started", round=2, rounds=2)
    with open(path, "a") as f:
        f.write('{"event": "reply", "round"')  # a line still being written
    assert [e["round"] for e in tail.new_events()] == [2]
    with open(path, "a") as f:
        f.write(': 2, "phase": "train", "site": "h1", "metrics": {"num-examples": 5}}\n')
    assert [(e["event"], e["site"]) for e in tail.new_events()] == [("reply", "h1")]
    assert tail.new_events() == []


def test_events_read_as_one_line_each():
    assert describe({"time": "2026-01-01T10:11:12+00:00", "event": "round-started", "round": 2, "rounds": 5}) == (
        "10:11:12 round 2/5 started"
    )
    line = describe(
        {
            "time": "2026-01-01T10:11:12+00:00",
            "event": "rejected",
            "round": 1,
            "phase": "train",
            "site": "hospital-2",
            "cause": "identity",
            "reason": "claims to be hospital-1 but its key is registered as hospital-2",
        }
    )
    assert line == (
        "10:11:12 round 1 train: rejected hospital-2 (identity): claims to be hospital-1 but its key is registered as hospital-2"
    )
    reply = {
        "event": "reply",
        "round": 1,
        "phase": "evaluate",
        "site": "h1",
        "metrics": {"num-examples": 40, "auroc": 0.8},
    }
    assert describe(reply).endswith("round 1 evaluate: h1 replied (n=40, auroc 0.8000)")


def test_a_run_streams_rounds_replies_rejections_and_refusals_in_order(tmp_path, capsys):
    s = settings(tmp_path, rounds=2, registered_sites=("hospital-1", "hospital-2"))
    (tmp_path / "run").mkdir()
    console = ConsoleProgress(s.run_dir / "events.jsonl")
    grid = FakeGrid([FakeSite(1, "hospital-1"), FakeSite(2, "hospital-2", claims="hospital-1")])
    run(grid, s)
    events = [json.loads(line) for line in (s.run_dir / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds == [
        "run-started",
        "reply",  # the normalisation query: hospital-1 ...
        "rejected",  # ... and the impostor
        "refused",
        "normalisation",
        "round-started",
        "reply",
        "reply",
        "round-finished",
        "round-started",
        "reply",
        "reply",
        "round-finished",
        "run-finished",
    ]
    assert events[0]["run_id"] == 7
    assert (events[2]["site"], events[2]["phase"], events[2]["cause"]) == ("hospital-2", "query", "identity")
    assert (events[3]["site"], events[3]["reason"]) == ("hospital-2", NOT_IN_NORMALISER)
    assert events[4]["sites"] == ["hospital-1"]
    assert [(e["phase"], e["site"]) for e in events[6:8]] == [("train", "hospital-1"), ("evaluate", "hospital-1")]
    assert events[8]["trained"] == ["hospital-1"] and events[8]["round"] == 1

    console.show_new()
    printed = capsys.readouterr().err.splitlines()
    assert len(printed) == len(events)
    assert printed[2].endswith(
        "normalisation query: rejected hospital-2 (identity): claims to be hospital-1 but its key is registered as hospital-2"
    )
    assert "round 1/2 done in" in printed[8] and "1 sites trained (hospital-1)" in printed[8]
    assert printed[-1].endswith(f"finished after 2 rounds; model card {s.run_dir / 'model_card.md'}")
