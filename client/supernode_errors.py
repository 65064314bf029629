"""Why a site's Flower SuperNode exited, in words a hospital's IT team can act on.

Flower's SuperNode reports a refused key, a TLS mismatch and an unreachable coordinator as
gRPC errors in its log and an exit code. ``explain_supernode_exit`` turns them into one plain
reason, and says whether retrying could help: a key the coordinator never registered or a
TLS mismatch is *permanent* (retrying for hours changes nothing); a coordinator that is down
may come back, and one that has just restarted may not have registered the site's key yet,
so those are retried (``--max-restarts`` times) before the site stops.

hymate-client exit codes (also in ``hymate-client --help`` and the README):

== =========================================================================================
0  the federation ended and the SuperNode exited normally
2  bad configuration: a flag, the config file, a key or certificate file, the local data or
   the privacy ledger (the message names which); nothing was started
3  refused by the coordinator: this site's key is not registered there, or TLS does not
   match (``--insecure`` against a TLS coordinator, or the wrong ``--root-cert``); a TLS
   mismatch is not retried, an unregistered key is (a coordinator that just restarted
   registers its sites' keys a few seconds after it listens)
4  the coordinator stayed unreachable (or the SuperNode kept failing) after ``--max-restarts``
   restarts
130, 143  stopped by Ctrl-C or SIGTERM
== =========================================================================================

How the supervisor uses this (``client.cli.supervise``): start the SuperNode with
``GIVE_UP_ARGS`` (without them a SuperNode facing a TLS mismatch or a closed port retries
forever and logs no reason); on each exit call ``explain_supernode_exit(code, log of that
start)``; stop at once on a ``permanent`` failure, printing ``reason`` and returning
``exit_code``; otherwise restart with backoff up to ``--max-restarts`` times, then print the
last reason (or the log file) and return ``EXIT_UNREACHABLE``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

EXIT_OK = 0
EXIT_BAD_CONFIGURATION = 2
EXIT_REFUSED = 3
EXIT_UNREACHABLE = 4

# Flower 1.42's own SuperNode exit codes (flwr.supercore.exit.ExitCode), copied so that this
# module needs no Flower internals.
FLWR_NODE_AUTH_KEY_INVALID = 302
FLWR_CONNECTION_ERROR = 305

# flower-supernode flags that make it give up (and exit, with the cause in its log) when it cannot
# connect for this long, instead of retrying forever; the supervisor's restarts take over from there.
GIVE_UP_ARGS = ("--max-wait-time", "60")

EXIT_CODES_HELP = """exit codes:
  0    the federation ended normally
  2    bad configuration (flag, config file, key or certificate file, local data, privacy ledger)
  3    refused by the coordinator: TLS mismatch (not retried), or key still not registered after --max-restarts
  4    coordinator unreachable after --max-restarts restarts
  130  Ctrl-C; 143 SIGTERM"""


@dataclass(frozen=True)
class SuperNodeFailure:
    """A recognised SuperNode failure: what to tell the site, and whether a restart could help."""

    reason: str
    permanent: bool
    exit_code: int


KEY_NOT_REGISTERED = SuperNodeFailure(
    "this site's key is not registered with the coordinator: give the coordinator this site's .pub file "
    "(made by `hymate-client init-key`) and check that --auth-key is its private key",
    # Retried (bounded): a coordinator that has just restarted accepts connections a few
    # seconds before it has registered the sites' keys again.
    permanent=False,
    exit_code=EXIT_REFUSED,
)
COORDINATOR_EXPECTS_TLS = SuperNodeFailure(
    "the coordinator expects TLS: drop --insecure, pass --root-cert (the coordinator's ca.crt) and --auth-key",
    permanent=True,
    exit_code=EXIT_REFUSED,
)
CERTIFICATE_NOT_TRUSTED = SuperNodeFailure(
    "the coordinator's TLS certificate was not accepted: check that --root-cert is the ca.crt of this coordinator "
    "and that --server names a host its certificate was made for (hymate-server init-certs --host)",
    permanent=True,
    exit_code=EXIT_REFUSED,
)
COORDINATOR_HAS_NO_TLS = SuperNodeFailure(
    "the coordinator does not speak TLS (it was started with --insecure); a site with --root-cert cannot connect",
    permanent=True,
    exit_code=EXIT_REFUSED,
)
KEY_INVALID = SuperNodeFailure(
    "the SuperNode could not use --auth-key: it must be an ECDSA private key in OpenSSH format "
    "(`hymate-client init-key`)",
    permanent=True,
    exit_code=EXIT_BAD_CONFIGURATION,
)
UNREACHABLE = SuperNodeFailure(
    "the coordinator is unreachable: check --server (HOST:PORT), that hymate-server runs there, "
    "and that no firewall blocks the port",
    permanent=False,
    exit_code=EXIT_UNREACHABLE,
)

# What flwr 1.42's flower-supernode logs when it gives up on connecting (captured against a real
# flower-superlink on 127.0.0.1; see tests/test_supernode_errors.py for the full lines). It logs
# "Exit Code: 305" and the cause on the next lines, yet the process exits with status 1; and it
# gives up on a coordinator that refuses or drops the connection only with --max-retries or
# --max-wait-time (without them it retries forever and logs just "Connection attempt failed").
GAVE_UP = re.compile(r"Exit Code: 305")
INSECURE_CHANNEL = re.compile(r"Option `--insecure` was set")
LOG_SIGNATURES: tuple[tuple[re.Pattern[str], SuperNodeFailure], ...] = (
    # The SuperLink has no node with this public key (--enable-supernode-auth, key not registered).
    (re.compile(r"\[code: 2004\] Failed to activate SuperNode"), KEY_NOT_REGISTERED),
    # A TLS client against a plain-HTTP SuperLink.
    (re.compile(r"WRONG_VERSION_NUMBER|wrong version number"), COORDINATOR_HAS_NO_TLS),
    # The server certificate is not signed by --root-cert, or not made for the --server host.
    (re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"), CERTIFICATE_NOT_TRUSTED),
    (
        re.compile(r"Connection refused|Name or service not known|Temporary failure in name resolution|timed out"),
        UNREACHABLE,
    ),
)
# An --insecure client against a TLS SuperLink: the server closes the plain-HTTP connection.
PLAIN_HTTP_DROPPED = re.compile(r"Server disconnected without sending a response")


def explain_supernode_exit(code: int, log_tail: str) -> SuperNodeFailure | None:
    """The plain reason for a SuperNode exit, from its exit status and the end of its log.

    ``code``: the SuperNode's exit status; ``log_tail``: the end of its log for this start (a few
    KB is enough; ``read_log_tail`` gives it). None when the exit is normal (status 0 with no
    give-up in the log) or not recognised: then the caller points at the log file and treats the
    exit as transient. A ``permanent`` failure must not be retried: the caller stops with
    ``exit_code`` and prints ``reason``.
    """
    if code == FLWR_NODE_AUTH_KEY_INVALID:
        return KEY_INVALID
    give_ups = list(GAVE_UP.finditer(log_tail))
    if not give_ups:
        return None
    cause = log_tail[give_ups[-1].end() :]
    for pattern, failure in LOG_SIGNATURES:
        if pattern.search(cause):
            return failure
    if PLAIN_HTTP_DROPPED.search(cause):
        return COORDINATOR_EXPECTS_TLS if INSECURE_CHANNEL.search(log_tail) else UNREACHABLE
    return None


def read_log_tail(path: Path, size: int = 16_000) -> str:
    """The last ``size`` bytes of a log file as text ('' when there is none yet)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
