"""Flower's SuperNode failures, turned into reasons a hospital can act on.

The logs in tests/data/supernode_logs/ were captured from flwr 1.42's ``flower-supernode``
against a real ``flower-superlink`` on 127.0.0.1 (``--enable-supernode-auth`` with TLS, or
``--insecure``); the SuperNode ran with ``--max-retries 2`` where it would otherwise retry forever.
"""

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


def test_refusals_are_permanent_and_an_unreachable_coordinator_is_not():
    assert KEY_NOT_REGISTERED.permanent and KEY_NOT_REGISTERED.exit_code == EXIT_REFUSED
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


def test_hymate_client_reports_the_reason_and_its_exit_code(tmp_path, capsys):
    (tmp_path / "supernode.log").write_text((LOGS / "key_not_registered.log").read_text())
    assert cli.final_exit_code(1, tmp_path) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "this site's key is not registered with the coordinator" in err and "supernode.log" in err
    (tmp_path / "supernode.log").write_text("something else went wrong\n")
    assert cli.final_exit_code(1, tmp_path) == EXIT_UNREACHABLE
    assert "exited with code 1" in capsys.readouterr().err
    assert cli.final_exit_code(0, tmp_path) == 0 and cli.final_exit_code(EXIT_REFUSED, tmp_path) == EXIT_REFUSED
