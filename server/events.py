"""The run's event stream: one JSON line per thing a coordinator wants to see as it happens.

The ServerApp runs in a process the SuperLink starts, so its log reaches the coordinator only
through ``flwr log``. It also appends every round, reply, rejection and refusal to the run
directory's event file (``RunDirectory.events_file``); ``hymate-server`` follows that file
while it waits for the run and prints each event as one line. This module owns the format: the only writer and the only reader.
"""

from __future__ import annotations

import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from hymate.files import to_jsonable


class EventLog:
    """Appends events to ``path`` (a line at a time, so a reader never sees half of one)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def emit(self, event: str, **fields: Any) -> None:
        record = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "event": event, **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(to_jsonable(record), sort_keys=True) + "\n")


class EventTail:
    """The events appended to ``path`` since the last look, starting where the file ends now
    (a resumed run's console shows this run's events, not the last one's)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def new_events(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next look
        self.offset += len(complete)
        return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]


class ConsoleProgress:
    """Prints a run's new events to the coordinator's console (stderr) as they happen."""

    def __init__(self, events_file: Path, stream: TextIO | None = None) -> None:
        self.tail = EventTail(events_file)
        self.stream = stream

    def show_new(self) -> None:
        for event in self.tail.new_events():
            print(f"hymate-server: {describe(event)}", file=self.stream or sys.stderr, flush=True)


def describe(event: dict[str, Any]) -> str:
    """One line for the coordinator's console."""
    kind = event.get("event", "?")
    when = str(event.get("time", ""))[11:19]
    text = _DESCRIBE.get(kind, lambda e: json.dumps(e, sort_keys=True))(event)
    return f"{when} {text}"


def _metrics(metrics: dict[str, Any]) -> str:
    shown = [f"n={metrics['num-examples']}"] if "num-examples" in metrics else []
    for key in ("train_loss", "loss", "auroc", "auprc"):
        value = metrics.get(key)
        if isinstance(value, float) and math.isfinite(value):
            shown.append(f"{key} {value:.4f}")
    return ", ".join(shown)


def _round(e: dict[str, Any]) -> str:
    return f"round {e['round']}" + (f"/{e['rounds']}" if "rounds" in e else "")


def _phase(e: dict[str, Any]) -> str:
    return "normalisation query" if e["phase"] == "query" else f"{_round(e)} {e['phase']}"


_DESCRIBE = {
    "run-started": lambda e: (
        f"run {e.get('run_id')}: {e.get('rounds')} rounds of {e.get('strategy')}"
        + (f", resuming after round {e['resumed_after']}" if e.get("resumed_after") else "")
    ),
    "waiting": lambda e: (
        f"waiting for sites: {e['connected']} of {e['required']} connected"
        + (f" (missing {', '.join(e['missing'])})" if e.get("missing") else "")
    ),
    "normalisation": lambda e: f"normalisation statistics fixed from {len(e['sites'])} sites: {', '.join(e['sites'])}",
    "initialised": lambda e: f"starting from {e['init_from']} (frozen: {e['freeze']})",
    "refused": lambda e: f"refused {e['site']} (node {e['node_id']}) for this run: {e['reason']}",
    "round-started": lambda e: f"{_round(e)} started",
    "reply": lambda e: f"{_phase(e)}: {e['site']} replied ({_metrics(e.get('metrics', {}))})",
    "rejected": lambda e: f"{_phase(e)}: rejected {e['site']} ({e['cause']}): {e['reason']}",
    "round-finished": lambda e: (
        f"{_round(e)} done in {e['seconds']:.0f} s: {len(e['trained'])} sites trained ({', '.join(e['trained'])})"
        + (f"; {_metrics(e['evaluate'])}" if e.get("evaluate") else "")
    ),
    "round-failed": lambda e: f"{_round(e)} failed, the model is kept: {e['reason']}",
    "run-finished": lambda e: f"finished after {e['rounds_completed']} rounds; model card {e['model_card']}",
    "run-failed": lambda e: f"run failed: {e['reason']}",
}
