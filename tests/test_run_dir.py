"""The coordinator's run directory: atomic rounds, resume, and no silent overwrite."""

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdam

from server.federation_facts import FederationFacts
from server.run_dir import RoundCheckpoint, RunDirectory, RunDirError, restore_strategy_state, strategy_state
from server.settings import ServerSettings

FACTS = FederationFacts(variables=["HR"], static_names=["Age"], dataset="synthetic", normalizer={})


def checkpoint(r: int) -> RoundCheckpoint:
    return RoundCheckpoint(
        r, {"w": np.full((2, 2), r, np.float32)}, {"momentum": r}, {"round": r, "train": {"loss": 1.0 / r}}
    )


def test_rounds_round_trip_and_history_is_in_order(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.prepare(resume=False)
    run.write_federation(FACTS, ServerSettings())
    for r in (1, 2, 3):
        run.write_round(checkpoint(r))
    assert run.completed_rounds() == [1, 2, 3]
    back = run.read_round(2)
    np.testing.assert_array_equal(back.weights["w"], np.full((2, 2), 2, np.float32))
    assert back.strategy_state == {"momentum": 2}
    assert [m["round"] for m in run.history()] == [1, 2, 3]


def test_a_half_written_round_is_invisible_and_cleared_on_resume(tmp_path):
    run = RunDirectory(tmp_path)
    run.prepare(resume=False)
    run.write_federation(FACTS, ServerSettings())
    run.write_round(checkpoint(1))
    torn = tmp_path / ".round-002.tmp"
    torn.mkdir()
    (torn / "weights.npz").write_bytes(b"partial")
    assert run.completed_rounds() == [1]
    run.prepare(resume=True)
    assert not torn.exists()


def test_a_fresh_run_refuses_a_used_run_dir_and_resume_needs_a_started_one(tmp_path):
    run = RunDirectory(tmp_path / "run")
    with pytest.raises(RunDirError, match="holds no started run"):
        run.prepare(resume=True)
    run.prepare(resume=False)
    run.write_federation(FACTS, ServerSettings())
    run.write_round(checkpoint(1))
    with pytest.raises(RunDirError, match="already holds a run .1 rounds.; pass --resume"):
        run.prepare(resume=False)
    assert run.completed_rounds() == [1]  # nothing already written was lost


def test_a_corrupt_checkpoint_is_a_named_error(tmp_path):
    run = RunDirectory(tmp_path)
    run.prepare(resume=False)
    run.write_round(checkpoint(1))
    (tmp_path / "round-001" / "weights.npz").write_bytes(b"not a zip")
    with pytest.raises(RunDirError, match="round-001 is unreadable"):
        run.read_round(1)
    assert run.history() == [checkpoint(1).metrics]  # the metrics alone are still readable
    (tmp_path / "round-001" / "metrics.json").write_text("{truncated")
    with pytest.raises(RunDirError, match="round-001 is unreadable"):
        run.history()


def test_server_optimizer_state_survives_a_checkpoint():
    strategy = FedAdam()
    strategy.m_t = {"w": np.ones(3)}
    state = strategy_state(strategy)
    fresh = FedAdam()
    restore_strategy_state(fresh, state)
    np.testing.assert_array_equal(fresh.m_t["w"], np.ones(3))


def test_the_facts_round_trip_and_a_damaged_federation_file_is_named(tmp_path):
    run = RunDirectory(tmp_path)
    run.prepare(resume=False)
    run.write_federation(FACTS, ServerSettings(rounds=4))
    assert run.read_facts() == FACTS
    (tmp_path / "federation.json").write_text('{"settings": {}}')
    with pytest.raises(RunDirError, match="federation.json holds no valid 'facts'"):
        run.read_facts()
