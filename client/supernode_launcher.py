"""Start Flower's SuperNode with a short idle poll: ``python -m client.supernode_launcher ARGS``.

Why: flwr 1.42's SuperNode sleeps a hard-coded 3 s whenever a pull from the SuperLink finds no
message (``flwr/supernode/start_client_internal.py``). It pulls again right after sending each
reply, before the coordinator has aggregated, so every message of a round waits out most of
those 3 s: at 3 synthetic sites, 6-7 s of a 12-15 s round (bench/deployment_round.py). No flag
sets it, so hymate-client starts the SuperNode through this module, which caps the module's
waits at ``IDLE_POLL_S``; everything else is the installed ``flower-supernode``, with the same
arguments. tests/test_supernode_launcher.py fails when a new flwr changes that loop.
"""

from __future__ import annotations

import sys
import time
from types import ModuleType

from flwr.supernode import start_client_internal
from flwr.supernode.cli import flower_supernode

IDLE_POLL_S = 0.25
"""The longest the SuperNode waits between pulls: about 4 small requests a second per site."""


class _ShortWaits(ModuleType):
    """The ``time`` module, except that ``sleep`` never waits longer than ``IDLE_POLL_S``."""

    def __init__(self) -> None:
        super().__init__("time")

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, IDLE_POLL_S))


def shorten_idle_poll() -> None:
    """Make the SuperNode's message loop poll every ``IDLE_POLL_S`` instead of every 3 s."""
    if getattr(start_client_internal, "time", None) is not time:
        raise RuntimeError(
            "flwr's SuperNode loop no longer waits through the time module: review client/supernode_launcher.py"
        )
    start_client_internal.time = _ShortWaits()


if __name__ == "__main__":
    shorten_idle_poll()
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())
