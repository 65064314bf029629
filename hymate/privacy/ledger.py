"""A site's privacy ledger: every DP-SGD step it ever took, composed, on its own disk.

``<state_dir>/privacy/ledger.json`` holds the target (epsilon, delta), the accountant type,
the accountant's full history (Opacus's ``state_dict()``: ``(noise multiplier, sample rate,
steps)`` entries, consecutive equal settings merged as Opacus's own step hook merges them),
the epsilon that history spends, one entry per round trained, and every refusal.

The ledger is the only thing standing between a site and an unbounded privacy loss, so it
fails closed:

- Every write is atomic (temp file + rename, ``hymate.files``) and happens under a file lock
  after re-reading the file: a torn write or two processes racing cannot lose a round.
- Loading validates everything and recomputes the epsilon from the history; anything odd
  (truncated JSON, a negative or non-finite number, a history entry of the wrong shape, a
  round log that does not add up to the history, a stored epsilon the history does not
  give) raises ``LedgerError`` naming the file and the problem. Nothing ever starts a
  fresh budget silently.
- ``privacy/STARTED`` is written beside the ledger when it is created and records its target
  and (after each round) how many rounds the ledger held: a ledger that disappears while
  the marker remains is an error (restore it from backup), and so is one whose target
  differs from the marker's or that holds fewer rounds than the marker saw (rolled back or
  replaced). Deleting both files is the one reset nothing local can detect.
- Opening with another target, delta or accountant than the ledger's raises
  ``LedgerMismatchError``: a site cannot change its budget by changing a flag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hymate.files import atomic_write_text
from hymate.privacy.calibration import ACCOUNTANTS

log = logging.getLogger(__name__)

LEDGER_FORMAT = "hymate-privacy-ledger"
LEDGER_VERSION = 1
LEDGER_DIR = "privacy"
LEDGER_FILE = "ledger.json"
MARKER_FILE = "STARTED"
_EPSILON_RTOL = 1e-6  # stored vs recomputed epsilon (JSON keeps floats exactly; this is slack for library numerics)

HistoryEntry = tuple[float, float, int]  # (noise multiplier, sample rate, steps), Opacus's layout


class LedgerError(RuntimeError):
    """A privacy ledger is missing, unreadable or inconsistent; says which file and why."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"privacy ledger {path}: {problem}")
        self.path = Path(path)
        self.problem = problem


class LedgerMismatchError(LedgerError):
    """The ledger on disk was created for another budget than the one asked for."""


@dataclass(frozen=True)
class RoundRecord:
    """One round trained under DP: its settings and the epsilon spent after it."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    recorded_at: str
    label: str = ""


@dataclass(frozen=True)
class Refusal:
    """A round the site declined to train because it would have exceeded the budget."""

    refused_at: str
    reason: str
    epsilon_spent: float
    epsilon_if_trained: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    label: str = ""


def compose_epsilon(history: Sequence[HistoryEntry], delta: float, accountant: str) -> float:
    """Epsilon of ``history`` at ``delta`` under Opacus's ``accountant`` ("rdp" or "prv"); 0 if empty."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant  # loaded on first use: see hymate.privacy

    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(entry) for entry in history]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(acc.get_epsilon(delta=delta))


def append_steps(
    history: Sequence[HistoryEntry], noise_multiplier: float, sample_rate: float, steps: int
) -> list[HistoryEntry]:
    """``history`` plus ``steps`` steps, merged into the last entry when its settings are equal.

    The same merge Opacus's optimizer hook does step by step, so a ledger history and the
    history of an accountant that trained the same rounds are equal entry for entry.
    """
    out = [tuple(e) for e in history]
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        out[-1] = (out[-1][0], out[-1][1], out[-1][2] + steps)
    else:
        out.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return out  # type: ignore[return-value]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _check_settings(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (isinstance(noise_multiplier, int | float) and math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a positive number, got {noise_multiplier!r}")
    if not (isinstance(sample_rate, int | float) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


@dataclass(frozen=True)
class _State:
    """The ledger's content, validated."""

    target_epsilon: float
    delta: float
    accountant: str
    history: tuple[HistoryEntry, ...]
    epsilon_spent: float
    rounds: tuple[RoundRecord, ...]
    refusals: tuple[Refusal, ...]
    created_at: str

    def to_json(self) -> str:
        doc = {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "created_at": self.created_at,
            "epsilon_spent": self.epsilon_spent,
            "rounds_trained": len(self.rounds),
            "accountant_state": {"mechanism": self.accountant, "history": [list(e) for e in self.history]},
            "rounds": [asdict(r) for r in self.rounds],
            "refusals": [asdict(r) for r in self.refusals],
        }
        return json.dumps(doc, indent=2, allow_nan=False) + "\n"


class _Reader:
    """Validates one ledger document; every failure is a ``LedgerError`` naming the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, problem: str) -> LedgerError:
        return LedgerError(self.path, problem)

    def number(self, obj: dict, key: str, where: str, *, positive: bool = False, at_most: float | None = None) -> float:
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(f"{where}{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise self.fail(f"{where}{key} is not finite ({value!r})")
        if value < 0 or (positive and value == 0):
            raise self.fail(f"{where}{key} must be {'positive' if positive else 'non-negative'}, got {value!r}")
        if at_most is not None and value > at_most:
            raise self.fail(f"{where}{key} must be at most {at_most}, got {value!r}")
        return float(value)

    def integer(self, obj: dict, key: str, where: str) -> int:
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(f"{where}{key} must be a positive integer, got {value!r}")
        return value

    def text(self, obj: dict, key: str, where: str, default: str | None = None) -> str:
        value = obj.get(key, default)
        if not isinstance(value, str):
            raise self.fail(f"{where}{key} must be text, got {value!r}")
        return value

    def history_entry(self, entry: Any, i: int) -> HistoryEntry:
        where = f"accountant_state.history[{i}]"
        if not (isinstance(entry, list) and len(entry) == 3):
            raise self.fail(f"{where} must be [noise_multiplier, sample_rate, steps], got {entry!r}")
        as_dict = dict(zip(("noise_multiplier", "sample_rate", "steps"), entry, strict=True))
        return (
            self.number(as_dict, "noise_multiplier", f"{where}.", positive=True),
            self.number(as_dict, "sample_rate", f"{where}.", positive=True, at_most=1.0),
            self.integer(as_dict, "steps", f"{where}."),
        )

    def round_record(self, obj: Any, i: int) -> RoundRecord:
        where = f"rounds[{i}]."
        if not isinstance(obj, dict):
            raise self.fail(f"rounds[{i}] must be an object, got {obj!r}")
        return RoundRecord(
            noise_multiplier=self.number(obj, "noise_multiplier", where, positive=True),
            sample_rate=self.number(obj, "sample_rate", where, positive=True, at_most=1.0),
            steps=self.integer(obj, "steps", where),
            epsilon_after=self.number(obj, "epsilon_after", where),
            recorded_at=self.text(obj, "recorded_at", where),
            label=self.text(obj, "label", where, ""),
        )

    def refusal(self, obj: Any, i: int) -> Refusal:
        where = f"refusals[{i}]."
        if not isinstance(obj, dict):
            raise self.fail(f"refusals[{i}] must be an object, got {obj!r}")
        return Refusal(
            refused_at=self.text(obj, "refused_at", where),
            reason=self.text(obj, "reason", where),
            epsilon_spent=self.number(obj, "epsilon_spent", where),
            epsilon_if_trained=self.number(obj, "epsilon_if_trained", where),
            noise_multiplier=self.number(obj, "noise_multiplier", where, positive=True),
            sample_rate=self.number(obj, "sample_rate", where, positive=True, at_most=1.0),
            steps=self.integer(obj, "steps", where),
            label=self.text(obj, "label", where, ""),
        )

    def read(self) -> _State:
        try:
            raw = self.path.read_text()
        except OSError as e:
            raise self.fail(f"cannot be read ({e.strerror or e})") from e
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as e:
            raise self.fail(f"is not valid JSON (truncated or edited?): {e}") from e
        if not isinstance(doc, dict):
            raise self.fail("must hold a JSON object")
        if doc.get("format") != LEDGER_FORMAT or doc.get("version") != LEDGER_VERSION:
            found = f"format {doc.get('format')!r}, version {doc.get('version')!r}"
            raise self.fail(f"is not a {LEDGER_FORMAT} v{LEDGER_VERSION} file ({found})")
        target = self.number(doc, "target_epsilon", "", positive=True)
        delta = self.number(doc, "delta", "", positive=True)
        if delta >= 1:
            raise self.fail(f"delta must be below 1, got {delta}")
        accountant = self.text(doc, "accountant", "")
        if accountant not in ACCOUNTANTS:
            raise self.fail(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        state = doc.get("accountant_state")
        if not isinstance(state, dict) or not isinstance(state.get("history"), list):
            raise self.fail("accountant_state.history is missing or not a list")
        if state.get("mechanism") != accountant:
            mechanism = state.get("mechanism")
            raise self.fail(f"accountant_state.mechanism {mechanism!r} differs from accountant {accountant!r}")
        history = tuple(self.history_entry(e, i) for i, e in enumerate(state["history"]))
        rounds_raw, refusals_raw = doc.get("rounds"), doc.get("refusals")
        if not isinstance(rounds_raw, list) or not isinstance(refusals_raw, list):
            raise self.fail("rounds and refusals must be lists")
        rounds = tuple(self.round_record(r, i) for i, r in enumerate(rounds_raw))
        refusals = tuple(self.refusal(r, i) for i, r in enumerate(refusals_raw))
        if doc.get("rounds_trained") != len(rounds):
            raise self.fail(f"rounds_trained is {doc.get('rounds_trained')!r} but {len(rounds)} rounds are logged")
        replayed: list[HistoryEntry] = []
        for r in rounds:
            replayed = append_steps(replayed, r.noise_multiplier, r.sample_rate, r.steps)
        if tuple(replayed) != history:
            raise self.fail("the round log does not add up to the accountant history")
        spent = self.number(doc, "epsilon_spent", "")
        recomputed = compose_epsilon(history, delta, accountant)
        if not math.isclose(spent, recomputed, rel_tol=_EPSILON_RTOL, abs_tol=1e-12):
            raise self.fail(f"stored epsilon_spent {spent!r} does not match its history's epsilon {recomputed!r}")
        if rounds and not math.isclose(rounds[-1].epsilon_after, spent, rel_tol=_EPSILON_RTOL, abs_tol=1e-12):
            last = rounds[-1].epsilon_after
            raise self.fail(f"the last round's epsilon_after {last!r} differs from epsilon_spent {spent!r}")
        return _State(target, delta, accountant, history, spent, rounds, refusals, self.text(doc, "created_at", ""))


class PrivacyLedger:
    """The privacy spend of one site, composed over every round it ever trained.

    Open with ``PrivacyLedger.open(state_dir, target_epsilon, delta, accountant)``; ask
    ``cost_if``/``can_afford`` before a round and ``record`` after it succeeded.
    """

    def __init__(self, directory: Path, state: _State):
        self.directory = Path(directory)
        self._state = state

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, state_dir: Path | str, target_epsilon: float, delta: float, accountant: str = "rdp") -> PrivacyLedger:
        """The ledger under ``<state_dir>/privacy/``; created (empty) on first use.

        Raises ``LedgerMismatchError`` if it exists with another target/delta/accountant,
        ``LedgerError`` if it is corrupt, or missing while ``privacy/STARTED`` says it existed.
        """
        if not (math.isfinite(target_epsilon) and target_epsilon > 0):
            raise ValueError(f"target_epsilon must be a positive number, got {target_epsilon}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        directory = Path(state_dir) / LEDGER_DIR
        with _locked(directory):
            path, marker = directory / LEDGER_FILE, directory / MARKER_FILE
            if path.exists():
                state = _Reader(path).read()
                cls._check_marker(marker, state, path)
            elif marker.exists():
                raise LedgerError(
                    path,
                    f"is missing, but {marker} shows this site started DP training with a ledger here; "
                    "restore the ledger from a backup (a new ledger would forget the privacy already spent)",
                )
            else:
                state = _State(float(target_epsilon), float(delta), accountant, (), 0.0, (), (), _now())
                atomic_write_text(path, state.to_json())
                cls._write_marker(marker, state)
                log.info("privacy ledger created at %s: epsilon %g, delta %g, %s", path, target_epsilon, delta,
                         accountant)  # fmt: skip
        ledger = cls(directory, state)
        asked = {"target_epsilon": float(target_epsilon), "delta": float(delta), "accountant": accountant}
        held = {"target_epsilon": state.target_epsilon, "delta": state.delta, "accountant": state.accountant}
        if asked != held:
            raise LedgerMismatchError(
                ledger.path,
                f"was created for {held}, but {asked} was asked for; a site's budget cannot change "
                "(use a new state directory only for a genuinely new site)",
            )
        return ledger

    @staticmethod
    def _write_marker(marker: Path, state: _State) -> None:
        """The budget, and a high-water mark of rounds trained (rewritten after every round)."""
        body = {"target_epsilon": state.target_epsilon, "delta": state.delta, "accountant": state.accountant,
                "created_at": state.created_at, "rounds_trained": len(state.rounds)}  # fmt: skip
        atomic_write_text(marker, json.dumps(body, indent=2) + "\n")

    @classmethod
    def _check_marker(cls, marker: Path, state: _State, path: Path) -> None:
        if not marker.exists():
            log.warning("privacy ledger %s had no %s marker; writing it", path, MARKER_FILE)
            cls._write_marker(marker, state)
            return
        try:
            body = json.loads(marker.read_text())
            held = (float(body["target_epsilon"]), float(body["delta"]), body["accountant"])
            rounds = int(body.get("rounds_trained", 0))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LedgerError(path, f"its marker {marker} is unreadable ({e})") from e
        if held != (state.target_epsilon, state.delta, state.accountant):
            raise LedgerError(
                path,
                f"its budget (epsilon {state.target_epsilon}, delta {state.delta}, {state.accountant}) differs from "
                f"the one {marker} recorded at creation (epsilon {held[0]}, delta {held[1]}, {held[2]})",
            )
        if len(state.rounds) < rounds:
            raise LedgerError(
                path,
                f"holds {len(state.rounds)} trained rounds, but {marker} saw {rounds}: the ledger was rolled back "
                "or replaced, and would under-report the privacy spent",
            )

    # -- reading -----------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.directory / LEDGER_FILE

    @property
    def target_epsilon(self) -> float:
        return self._state.target_epsilon

    @property
    def delta(self) -> float:
        return self._state.delta

    @property
    def accountant(self) -> str:
        return self._state.accountant

    @property
    def history(self) -> tuple[HistoryEntry, ...]:
        return self._state.history

    @property
    def epsilon_spent(self) -> float:
        return self._state.epsilon_spent

    @property
    def epsilon_remaining(self) -> float:
        return max(0.0, self.target_epsilon - self.epsilon_spent)

    @property
    def rounds_trained(self) -> int:
        return len(self._state.rounds)

    @property
    def rounds(self) -> tuple[RoundRecord, ...]:
        return self._state.rounds

    @property
    def refusals(self) -> tuple[Refusal, ...]:
        return self._state.refusals

    def accountant_state(self) -> dict[str, Any]:
        """Opacus's accountant ``state_dict()`` for this history (load it into an accountant)."""
        return {"mechanism": self.accountant, "history": [tuple(e) for e in self.history]}

    def cost_if(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon spent after hypothetically adding ``steps`` steps with these settings."""
        _check_settings(noise_multiplier, sample_rate, steps)
        history = append_steps(self.history, noise_multiplier, sample_rate, steps)
        return compose_epsilon(history, self.delta, self.accountant)

    def can_afford(self, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        return self.cost_if(noise_multiplier, sample_rate, steps) <= self.target_epsilon

    # -- writing -----------------------------------------------------------------------
    def record(self, noise_multiplier: float, sample_rate: float, steps: int, label: str = "") -> float:
        """Add a trained round to the history and save; returns the epsilon spent now.

        Records what happened even if it exceeds the target (a refusal is ``train_private_round``'s
        job, before training): the ledger must never under-report.
        """
        _check_settings(noise_multiplier, sample_rate, steps)
        with self._locked_current():
            history = append_steps(self.history, noise_multiplier, sample_rate, steps)
            spent = compose_epsilon(history, self.delta, self.accountant)
            entry = RoundRecord(float(noise_multiplier), float(sample_rate), int(steps), spent, _now(), label)
            rounds = (*self._state.rounds, entry)
            self._save(self._replace(history=tuple(history), epsilon_spent=spent, rounds=rounds))
            self._write_marker(self.directory / MARKER_FILE, self._state)
        log.info("privacy ledger %s: round %d recorded, epsilon %.4f of %g spent", self.path, self.rounds_trained,
                 spent, self.target_epsilon)  # fmt: skip
        return spent

    def record_refusal(
        self,
        reason: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        epsilon_if_trained: float,
        label: str = "",
    ) -> Refusal:
        """Log a round the site declined to train (and why) and save."""
        refusal = Refusal(
            _now(), reason, self.epsilon_spent, float(epsilon_if_trained),
            float(noise_multiplier), float(sample_rate), int(steps), label,
        )  # fmt: skip
        with self._locked_current():
            self._save(self._replace(refusals=(*self._state.refusals, refusal)))
        return refusal

    @contextlib.contextmanager
    def _locked_current(self) -> Iterator[None]:
        """Hold the lock, and make sure the file still says what this object last read or wrote."""
        with _locked(self.directory):
            if not self.path.exists():
                raise LedgerError(self.path, "disappeared while in use")
            on_disk = _Reader(self.path).read()
            if (on_disk.history, on_disk.rounds, on_disk.refusals) != (self.history, self.rounds, self.refusals):
                raise LedgerError(self.path, "changed on disk since it was opened (another process training the site?)")
            yield

    def _replace(self, **changes: Any) -> _State:
        return dataclasses.replace(self._state, **changes)

    def _save(self, state: _State) -> None:
        atomic_write_text(self.path, state.to_json())
        self._state = state


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``<directory>/.lock`` (one ledger writer at a time)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
