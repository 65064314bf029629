"""``hymate-client``: a hospital joins a federation.

    hymate-client --server coordinator.example.org:9093 --dataset physionet2012 \\
        --data /data/p12 --root-cert ca.crt --auth-key site-key --state-dir /var/lib/hymate

Checks the local data once before connecting (a broken file fails here, with its name,
not in round 1), then runs a Flower SuperNode with the HyMaTE ClientApp until the
federation ends or it is stopped. All paths, certificates and keys come from these flags or
from ``--config FILE`` (TOML with the same names); nothing is downloaded or installed at
run time, and only model updates and aggregate metrics leave the site.

    hymate-client init-key /etc/hymate/key --name hospital-1    the site's own key pair (once)

Every option is checked before anything starts: a value of 0 is a value (``--dp-epsilon 0`` is an
error, not "no DP"; ``--max-restarts 0`` means no restart), the key must parse, match its
``.pub`` and be readable only by its owner (a key others can read is refused, not warned about),
and the root certificate must parse. Exit codes (``client.supernode_errors``): 0 done, 2 bad
configuration, 3 refused by the coordinator (TLS mismatch, not retried; key still not registered
after ``--max-restarts``),
4 coordinator unreachable after ``--max-restarts`` restarts (default 5), 130/143 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from client.app import app as installed_clientapp
from client.runner import AppPolicy, SiteRunner, new_runtime_secret
from client.site import (
    DEPRECATED_DP_KEYS,
    SETTING_RULES,
    DPSettings,
    SiteConfigError,
    SiteSettings,
    add_dp_flags,
    open_site,
)
from client.site_keys import SiteKeyError, check_root_certificate, check_site_key, write_site_key_pair
from client.supernode_errors import (
    EXIT_BAD_CONFIGURATION,
    EXIT_CODES_HELP,
    EXIT_UNREACHABLE,
    GIVE_UP_ARGS,
    explain_supernode_exit,
    read_log_tail,
)
from hymate.cli_options import add_deprecated_alias, config_file_options
from hymate.data import DataError, VocabularyChoice
from hymate.privacy import LedgerError, PrivacyLedger
from hymate.processes import free_port, start_child, stop_child
from hymate.settings_fields import add_flags, dest_of

log = logging.getLogger("hymate-client")

# Restarts of the SuperNode after it exits (an unreachable coordinator); 0 means none. Bounded by
# default so a site that cannot connect ends with a reason instead of retrying for ever.
DEFAULT_MAX_RESTARTS = 5


def build_parser() -> argparse.ArgumentParser:
    """Every option defaults to None, so a value given as 0 (or False) is told apart from one not given."""
    p = argparse.ArgumentParser(
        prog="hymate-client",
        description="Join a HyMaTE federation as a hospital site. "
        "`hymate-client init-key DIR` creates the site's key pair first.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="TOML file with any of these options (flags win)")
    p.add_argument("--server", help="coordinator HOST:PORT")
    p.add_argument("--dataset", help="synthetic, physionet2012, ...")
    p.add_argument("--data", type=Path, help="folder with the site's raw files")
    add_flags(p, VocabularyChoice, defaults={"vocabulary": None})
    p.add_argument("--site", help="use only this site's stays of the dataset (pilots, tests)")
    p.add_argument("--name", help="how the coordinator's reports name this site")
    p.add_argument("--state-dir", type=Path, help="the site's own state: caches, privacy ledger, audit log")
    p.add_argument("--root-cert", type=Path, help="CA certificate that signed the coordinator's certificate")
    p.add_argument("--auth-key", type=Path, help="this site's private key (its .pub is registered by the coordinator)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    dp = p.add_argument_group("differential privacy (the site's own budget)")
    add_dp_flags(dp, given_only=True)
    p.add_argument(
        "--secure-aggregation",
        action="store_true",
        default=None,
        help="send model updates and normalisation sums only masked, through Flower's SecAgg+ (plain training "
        "requests are refused)",
    )
    p.add_argument("--insecure", action="store_true", default=None, help="no TLS (never with patient data)")
    p.add_argument(
        "--max-restarts",
        type=int,
        help=f"restart the SuperNode at most this often when it exits (default {DEFAULT_MAX_RESTARTS}; 0: never)",
    )
    p.add_argument(
        "--accept-app-hash",
        action="append",
        metavar="SHA256",
        help="take part only in runs whose app bundle (FAB) has this SHA-256 (repeatable; default: any bundle "
        "that carries no site-side code)",
    )
    p.add_argument(
        "--runtime-port", type=int, help="loopback port between the SuperNode and this site's runner (default: free)"
    )
    p.add_argument("-v", "--verbose", action="store_true", default=None)
    for old, new in DEPRECATED_DP_KEYS.items():
        add_deprecated_alias(p, f"--{old}", f"--{new}")
    add_init_key_parser(p.add_subparsers(dest="command", metavar="init-key"))
    return p


def add_init_key_parser(commands) -> None:
    p = commands.add_parser(
        "init-key",
        help="create this site's key pair",
        description="Create this site's SuperNode key pair (ECDSA P-384, OpenSSH format) on this machine. "
        "Give only the .pub file to the coordinator; the private key never leaves the site.",
    )
    p.add_argument("directory", type=Path, help="folder for the key pair (created if missing)")
    p.add_argument("--name", default="site", help="file name of the key, and the name the coordinator registers")


def init_key(args: argparse.Namespace) -> int:
    private = write_site_key_pair(args.directory, args.name)
    print(f"private key: {private} (mode 0600; stays on this machine: pass it as --auth-key)")
    print(f"public key:  {private}.pub")
    print(f"Give only {private}.pub to the coordinator, who registers it as site {args.name!r}.")
    return 0


# Range rules of options that only the command line has (the site settings' own are in SETTING_RULES).
CLI_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_restarts": (lambda v: v >= 0, "must be 0 or more"),
    "runtime_port": (lambda v: 1 <= v <= 65535, "must be a port number (1-65535)"),
}


def merged_options(args: argparse.Namespace) -> dict:
    """Flags over the config file's values over the defaults; 0 and false are values like any other.

    Every value is checked here, before anything starts: a bad one is an error naming the flag
    (and the config file's key it came from), never a silently different setting.
    """
    from_file = config_file_options(args.config, build_parser(), SiteConfigError) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if v is not None}
    options = {"max_restarts": DEFAULT_MAX_RESTARTS} | {k: v for k, (v, _) in from_file.items()} | flags
    for name, (valid, rule) in (SETTING_RULES | CLI_RULES).items():
        value = options.get(name)
        if value is not None and not valid(value):
            where = f" (from --config {args.config}, key {from_file[name][1]!r})" if name not in flags else ""
            raise SiteConfigError(f"--{name.replace('_', '-')} {value!r}: {rule}{where}")
    return options


def site_config(options: dict) -> dict[str, str]:
    """The site's settings as node-config keys (paths made absolute: the SuperNode runs elsewhere)."""
    config = {}
    options = dict(options)
    if options.get("secure_aggregation"):
        options["secure_aggregation"] = "true"
    else:
        options.pop("secure_aggregation", None)
    for option in (
        "dataset",
        "data",
        "vocabulary",
        "site",
        "name",
        "state_dir",
        "device",
        "secure_aggregation",
        *(dest_of(f) for f in fields(DPSettings)),
    ):
        value = options.get(option)
        if value is not None:
            config[option.replace("_", "-")] = (
                str(Path(value).resolve()) if option in ("data", "state_dir") else str(value)
            )
    return config


def node_config_string(config: dict[str, str]) -> str:
    """``--node-config``: TOML ``key="value"`` pairs (JSON string escaping is valid TOML)."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in config.items())


def check_connection_files(options: dict) -> None:
    """Fail before connecting, naming the file, if the SuperNode could not use the key or certificate."""
    if options.get("insecure"):
        for flag in ("root_cert", "auth_key"):
            if options.get(flag):
                raise SiteConfigError(f"--insecure and --{flag.replace('_', '-')} contradict each other; choose one")
        return
    if not (options.get("root_cert") and options.get("auth_key")):
        raise SiteConfigError(
            "TLS and site authentication need --root-cert and --auth-key (or pass --insecure explicitly)"
        )
    check_root_certificate(options["root_cert"])
    check_site_key(options["auth_key"])


def run(options: dict) -> int:
    for required in ("server", "dataset", "state_dir"):
        if not options.get(required):
            raise SiteConfigError(f"--{required.replace('_', '-')} is required")
    secure = not options.get("insecure")
    check_connection_files(options)
    config = site_config(options)
    settings = SiteSettings.from_node_config(config)
    data = open_site(settings)  # fail now, with the file's name, rather than in round 1
    dp = settings.privacy(planned_rounds=1)
    if dp is not None:  # a tampered or missing ledger stops the site here, before it connects
        ledger = PrivacyLedger.open(settings.state_dir, dp.target_epsilon, dp.delta, dp.accountant)
        print(
            f"privacy: epsilon {ledger.epsilon_spent:.4f} of {dp.target_epsilon:g} spent over {ledger.rounds_trained} round(s)"
        )
    print(f"site {settings.display_name}: {len(data.train)} train, {len(data.val)} val, {len(data.test)} test stays")

    state_dir = settings.state_dir
    runtime_port = options.get("runtime_port") or free_port()
    secret_file = new_runtime_secret(state_dir / "runtime.secret")
    args = [
        sys.executable,
        "-m",
        "client.supernode_launcher",  # flower-supernode, with a short idle poll
        "--superlink",
        options["server"],
        "--node-config",
        node_config_string(config),
        # The SuperNode only relays messages; this process runs them with the installed ClientApp.
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret_file),
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
        *GIVE_UP_ARGS,  # a refused or dropped connection ends with its reason instead of retrying forever
    ]
    if secure:
        args += [
            "--root-certificates",
            str(Path(options["root_cert"]).resolve()),
            "--auth-supernode-private-key",
            str(Path(options["auth_key"]).resolve()),
        ]
    else:
        log.warning("INSECURE: no TLS to the coordinator. Never use this with patient data.")
        args += ["--insecure"]
    env = {"FLWR_HOME": str(state_dir / "flwr"), "FLWR_TELEMETRY_ENABLED": "0"}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the SuperNode is stopped on the way out
    runner = SiteRunner(
        f"127.0.0.1:{runtime_port}",
        secret_file.read_bytes(),
        installed_clientapp,
        AppPolicy(frozenset(options.get("accept_app_hash") or ())),
    )
    runner.start()
    try:
        return supervise(args, env, state_dir, options["max_restarts"])
    finally:
        runner.stop()


def supervise(args: list[str], env: dict[str, str], state_dir: Path, max_restarts: int) -> int:
    """Run the SuperNode, restarting it (with backoff) when it exits for a reason that may pass.

    A hospital's service should wait out a coordinator that is down or restarting, not die; but
    a refusal (key not registered, TLS mismatch) stops at once with its reason, since retrying
    changes nothing. Returns hymate-client's exit code (``client.supernode_errors``).
    """
    pid_file, log_file = state_dir / "supernode.pid", state_dir / "supernode.log"
    restarts, backoff = 0, 1.0
    while True:
        supernode = start_child(args, log_file, pid_file, env)
        log.info("SuperNode started (pid %d); log in %s", supernode.pid, log_file)
        started = time.monotonic()
        try:
            code = supernode.wait()
        finally:
            stop_child(supernode, pid_file)
        failure = explain_supernode_exit(code, read_log_tail(log_file))
        if failure is not None and failure.permanent:
            return _stop_with(failure.reason, failure.exit_code, log_file)
        reason = failure.reason if failure is not None else f"the SuperNode exited with code {code}"
        if time.monotonic() - started > 300:  # it was connected and working: count afresh
            restarts, backoff = 0, 1.0
        if restarts >= max_restarts:
            exit_code = failure.exit_code if failure is not None else EXIT_UNREACHABLE
            return _stop_with(f"{reason}; gave up after {restarts} restart(s)", exit_code, log_file)
        backoff = min(backoff * 2, 60.0)
        log.warning("%s; restarting it in %.0f s (log: %s)", reason, backoff, log_file)
        time.sleep(backoff)
        restarts += 1


def _stop_with(reason: str, exit_code: int, log_file: Path) -> int:
    print(f"hymate-client: error: {reason} (SuperNode log: {log_file})", file=sys.stderr)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "init-key":
        try:
            return init_key(args)
        except (SiteKeyError, OSError) as e:
            print(f"hymate-client init-key: error: {e}", file=sys.stderr)
            return EXIT_BAD_CONFIGURATION
    try:
        options = merged_options(args)
        logging.basicConfig(
            level=logging.INFO if options.get("verbose") else logging.WARNING,
            format="%(asctime)s %(name)s: %(message)s",
        )
        logging.getLogger("hymate-client").setLevel(logging.INFO)
        return run(options)
    except (SiteConfigError, SiteKeyError, DataError, LedgerError, ValueError, OSError) as e:
        print(f"hymate-client: error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIGURATION
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
