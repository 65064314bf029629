"""The privacy ledger: composition over rounds, restarts, refusals, and failing closed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opacus.accountants import create_accountant

from hymate.privacy import (
    LedgerError,
    LedgerMismatchError,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    RoundPlan,
    check_affordable,
)

REPO = Path(__file__).resolve().parents[1]
SIGMA, Q, STEPS = 1.1, 0.05, 40


def open_ledger(state_dir: Path, accountant: str = "rdp", target: float = 4.0) -> PrivacyLedger:
    return PrivacyLedger.open(state_dir, target, 1e-5, accountant)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_rounds_compose_like_one_accountant_over_all_of_them(tmp_path, accountant):
    ledger = open_ledger(tmp_path, accountant)
    assert ledger.epsilon_spent == 0.0 and ledger.rounds_trained == 0
    one = ledger.record(SIGMA, Q, STEPS)
    two = ledger.record(SIGMA, Q, STEPS)
    assert two > one > 0

    reference = create_accountant(accountant)  # one accountant stepping through both rounds
    for _ in range(2 * STEPS):
        reference.step(noise_multiplier=SIGMA, sample_rate=Q)
    assert ledger.history == tuple(tuple(e) for e in reference.history) == ((SIGMA, Q, 2 * STEPS),)
    assert math.isclose(two, reference.get_epsilon(1e-5), rel_tol=1e-9)
    assert ledger.rounds_trained == 2 and ledger.epsilon_spent == two
    assert math.isclose(ledger.cost_if(SIGMA, Q, STEPS), open_ledger(tmp_path, accountant).record(SIGMA, Q, STEPS))


def test_different_settings_compose_as_a_heterogeneous_history(tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.record(SIGMA, Q, STEPS)
    ledger.record(2.0, 0.1, 10)
    reference = create_accountant("rdp")
    reference.history = [(SIGMA, Q, STEPS), (2.0, 0.1, 10)]
    assert ledger.history == tuple(reference.history)
    assert math.isclose(ledger.epsilon_spent, reference.get_epsilon(1e-5), rel_tol=1e-12)


def test_a_new_process_continues_the_spend(tmp_path):
    script = textwrap.dedent(f"""
        from hymate.privacy import PrivacyLedger
        ledger = PrivacyLedger.open({str(tmp_path)!r}, 4.0, 1e-5, "rdp")
        ledger.record({SIGMA}, {Q}, {STEPS}, label="round 1")
        print(repr(ledger.epsilon_spent))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    spent_there = float(done.stdout.strip().splitlines()[-1])

    ledger = open_ledger(tmp_path)
    assert ledger.epsilon_spent == spent_there > 0
    assert ledger.rounds_trained == 1 and ledger.rounds[0].label == "round 1"
    assert ledger.record(SIGMA, Q, STEPS) > spent_there


def test_a_budget_for_n_rounds_refuses_round_n_plus_one(tmp_path):
    plan = RoundPlan(noise_multiplier=SIGMA, sample_rate=Q, steps_per_epoch=STEPS, local_epochs=1, n_train=100)
    ledger = open_ledger(tmp_path)
    after = [ledger.record(SIGMA, Q, STEPS) for _ in range(3)]
    target = (after[2] + ledger.cost_if(SIGMA, Q, STEPS)) / 2  # three rounds fit, a fourth does not
    tmp2 = tmp_path / "site"
    ledger = open_ledger(tmp2, target=target)
    for _ in range(3):
        check_affordable(ledger, plan)
        ledger.record(SIGMA, Q, STEPS)
    with pytest.raises(PrivacyBudgetExhausted) as refused:
        check_affordable(ledger, plan, label="round 4")
    message = str(refused.value)
    assert f"{ledger.epsilon_spent:.4f}" in message and f"{target:g}" in message
    assert refused.value.epsilon_spent == ledger.epsilon_spent and refused.value.target_epsilon == target
    assert refused.value.epsilon_if_trained > target
    reopened = open_ledger(tmp2, target=target)  # the refusal is on disk, the spend unchanged
    assert reopened.rounds_trained == 3 and len(reopened.refusals) == 1
    assert reopened.refusals[0].label == "round 4" and "over the target" in reopened.refusals[0].reason


def _tamper(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda d: d.__setitem__("epsilon_spent", -1.0), "epsilon_spent must be non-negative"),
        (lambda d: d.__setitem__("epsilon_spent", float("nan")), "epsilon_spent is not finite"),
        (lambda d: d.__setitem__("epsilon_spent", 0.5), "does not match its history"),
        (lambda d: d["accountant_state"]["history"].__setitem__(0, [1.1, 0.05]), r"history\[0\] must be"),
        (lambda d: d["accountant_state"]["history"].__setitem__(0, [1.1, 0.05, 20]), "does not add up"),
        (lambda d: d["accountant_state"].__setitem__("history", []), "does not add up"),
        (lambda d: d.__setitem__("target_epsilon", 40.0), "differs from the one"),
        (lambda d: d["rounds"][0].__setitem__("steps", "many"), r"rounds\[0\]\.steps must be"),
        (lambda d: d.pop("refusals"), "must be lists"),
    ],
)
def test_a_tampered_ledger_raises_naming_file_and_problem(tmp_path, edit, problem):
    open_ledger(tmp_path).record(SIGMA, Q, STEPS)
    path = tmp_path / "privacy" / "ledger.json"
    _tamper(path, edit)
    with pytest.raises(LedgerError, match=problem) as error:
        open_ledger(tmp_path, target=40.0 if "target" in problem else 4.0)
    assert str(path) in str(error.value)


def test_a_truncated_ledger_raises(tmp_path):
    open_ledger(tmp_path).record(SIGMA, Q, STEPS)
    path = tmp_path / "privacy" / "ledger.json"
    path.write_text(path.read_text()[:100])
    with pytest.raises(LedgerError, match="not valid JSON"):
        open_ledger(tmp_path)


def test_a_deleted_ledger_is_detected_by_its_marker(tmp_path):
    open_ledger(tmp_path).record(SIGMA, Q, STEPS)
    (tmp_path / "privacy" / "ledger.json").unlink()
    with pytest.raises(LedgerError, match="is missing, but .*STARTED"):
        open_ledger(tmp_path)


def test_a_rolled_back_ledger_is_detected_by_its_marker(tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.record(SIGMA, Q, STEPS)
    path = tmp_path / "privacy" / "ledger.json"
    old = path.read_text()
    ledger.record(SIGMA, Q, STEPS)
    path.write_text(old)  # a valid ledger, one round behind
    with pytest.raises(LedgerError, match="holds 1 trained rounds, but .* saw 2"):
        open_ledger(tmp_path)


def test_a_site_cannot_change_its_budget(tmp_path):
    open_ledger(tmp_path).record(SIGMA, Q, STEPS)
    with pytest.raises(LedgerMismatchError, match="cannot change"):
        PrivacyLedger.open(tmp_path, 8.0, 1e-5, "rdp")
    with pytest.raises(LedgerMismatchError):
        PrivacyLedger.open(tmp_path, 4.0, 1e-6, "rdp")
    with pytest.raises(LedgerMismatchError):
        PrivacyLedger.open(tmp_path, 4.0, 1e-5, "prv")


def test_two_writers_cannot_lose_a_round(tmp_path):
    first, second = open_ledger(tmp_path), open_ledger(tmp_path)
    first.record(SIGMA, Q, STEPS)
    with pytest.raises(LedgerError, match="changed on disk"):
        second.record(SIGMA, Q, STEPS)
    assert open_ledger(tmp_path).rounds_trained == 1
