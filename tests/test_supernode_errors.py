"""Flower's SuperNode failures, turned into reasons a hospital can act on.

The logs in tests/data/supernode_logs/ were captured from flwr 1.42's ``flower-supernode``
against a real ``flower-superlink`` on 127.0.0.1 (``--enable-supernode-auth`` with TLS, or
``--insecure``); the SuperNode ran with ``--max-retries 2`` where it would otherwise retry forever.
"""

import sys
from pathlib import Path

import pytest

from client import cli
from client.supernode_errors import (
    CERTIFICATE_NOT_TRUSTED,
    COORDINATOR_EXPECTS_TLS,
    COORDINATOR_HAS_NO_TLS,
    EXIT_BAD_CONFIGURATION,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    KEY_INVALID,
    KEY_NOT_REGISTERED,
    UNREACHABLE,
    explain_supernode_exit,
    read_log_tail,
)

LOGS = Path(__file__).parent / "data" / "supernode_logs"


@pytest.mark.parametrize(
    "log_name, expected",
    [
        ("key_not_registered.log", KEY_NOT_REGISTERED),  # an unregistered key against --enable-supernode-auth
        ("insecure_against_tls.log", COORDINATOR_EXPECTS_TLS),  # --insecure against a TLS SuperLink
        ("tls_against_insecure.log", COORDINATOR_HAS_NO_TLS),  # TLS against an --insecure SuperLink
        ("wrong_root_cert.log", CERTIFICATE_NOT_TRUSTED),  # --root-certificates of another CA
        ("unreachable.log", UNREACHABLE),  # nothing listens on the port
    ],
)
def test_real_supernode_logs_map_to_plain_reasons(log_name, expected):
    # The SuperNode exits with status 1 in every one of these (the 305 is only in its log).
    assert explain_supernode_exit(1, read_log_tail(LOGS / log_name)) is expected


def test_tls_mismatches_are_permanent_an_unregistered_key_and_an_unreachable_coordinator_are_not():
    # A just-restarted coordinator listens a few seconds before it has registered its sites again.
    assert not KEY_NOT_REGISTERED.permanent and KEY_NOT_REGISTERED.exit_code == EXIT_REFUSED
    assert COORDINATOR_EXPECTS_TLS.permanent and COORDINATOR_EXPECTS_TLS.exit_code == EXIT_REFUSED
    assert "not registered with the coordinator" in KEY_NOT_REGISTERED.reason
    assert "expects TLS" in COORDINATOR_EXPECTS_TLS.reason and "--insecure" in COORDINATOR_EXPECTS_TLS.reason
    assert not UNREACHABLE.permanent and UNREACHABLE.exit_code == EXIT_UNREACHABLE


def test_the_last_give_up_of_a_restarted_supernode_counts():
    log = read_log_tail(LOGS / "unreachable.log") + read_log_tail(LOGS / "key_not_registered.log")
    assert explain_supernode_exit(1, log) is KEY_NOT_REGISTERED


def test_unrecognised_exits_are_left_to_the_caller():
    assert explain_supernode_exit(0, "INFO: SuperNode terminated gracefully.") is None
    assert explain_supernode_exit(1, "Traceback ...\nKeyError: 'x'") is None
    # A dropped plain-HTTP connection without --insecure is not a TLS mismatch.
    log = read_log_tail(LOGS / "insecure_against_tls.log").replace("Option `--insecure` was set", "")
    assert explain_supernode_exit(1, log) is UNREACHABLE
    assert explain_supernode_exit(302, "") is KEY_INVALID and KEY_INVALID.exit_code == EXIT_BAD_CONFIGURATION


def test_read_log_tail_keeps_the_end(tmp_path):
    log = tmp_path / "supernode.log"
    assert read_log_tail(log) == ""
    log.write_text("a" * 100 + "END")
    assert read_log_tail(log, size=5) == "aaEND"


def fake_supernode(log_text: str, code: int) -> list[str]:
    """A stand-in SuperNode that prints ``log_text`` and exits with ``code``."""
    return [sys.executable, "-c", f"import sys; sys.stdout.write({log_text!r}); sys.exit({code})"]


def test_a_tls_mismatch_stops_the_site_at_once_with_its_reason(tmp_path, capsys):
    mismatch = fake_supernode((LOGS / "tls_against_insecure.log").read_text(), 1)
    assert cli.supervise(mismatch, {}, tmp_path, max_restarts=5) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert COORDINATOR_HAS_NO_TLS.reason in err and "supernode.log" in err
    assert "gave up after" not in err  # not retried
    assert (tmp_path / "supernode.log").read_text().count("WRONG_VERSION_NUMBER") == 1


def test_an_unregistered_key_is_retried_then_refused_with_its_reason(tmp_path, capsys):
    """A coordinator that has just restarted registers its sites' keys a few seconds after it listens."""
    refused = fake_supernode((LOGS / "key_not_registered.log").read_text(), 1)
    assert cli.supervise(refused, {}, tmp_path, max_restarts=1) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "this site's key is not registered with the coordinator" in err and "gave up after 1 restart(s)" in err
    assert (tmp_path / "supernode.log").read_text().count("Failed to activate SuperNode") >= 2


def test_an_unexplained_exit_is_retried_then_reported(tmp_path, capsys):
    flaky = fake_supernode("something else went wrong\n", 1)
    assert cli.supervise(flaky, {}, tmp_path, max_restarts=1) == EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert "the SuperNode exited with code 1; gave up after 1 restart(s)" in err
    assert (tmp_path / "supernode.log").read_text().count("something else went wrong") == 2
