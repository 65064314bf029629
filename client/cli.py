"""``hymate-client``: a hospital joins a federation.

    hymate-client --server coordinator.example.org:9093 --dataset physionet2012 \\
        --data /data/p12 --root-cert ca.crt --auth-key site-key --state-dir /var/lib/hymate

Checks the local data once before connecting (a broken file fails here, with its name,
not in round 1), then runs a Flower SuperNode with the HyMaTE ClientApp until the
federation ends or it is stopped. All paths, certificates and keys come from these flags or
from ``--config FILE`` (TOML with the same names); nothing is downloaded or installed at
run time, and only model updates and aggregate metrics leave the site.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import tomllib
from pathlib import Path

from client.app import app as installed_clientapp
from client.runner import AppPolicy, SiteRunner, new_runtime_secret
from client.site import SiteConfigError, SiteSettings, open_site
from hymate.data import DataError
from hymate.privacy import LedgerError, PrivacyLedger
from hymate.processes import free_port, start_child, stop_child

log = logging.getLogger("hymate-client")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hymate-client", description="Join a HyMaTE federation as a hospital site.")
    p.add_argument("--config", type=Path, help="TOML file with any of these options (flags win)")
    p.add_argument("--server", help="coordinator HOST:PORT")
    p.add_argument("--dataset", help="synthetic, physionet2012, ...")
    p.add_argument("--data", type=Path, help="folder with the site's raw files")
    p.add_argument("--site", help="use only this site's stays of the dataset (pilots, tests)")
    p.add_argument("--name", help="how the coordinator's reports name this site")
    p.add_argument("--state-dir", type=Path, help="the site's own state: caches, privacy ledger, audit log")
    p.add_argument("--root-cert", type=Path, help="CA certificate that signed the coordinator's certificate")
    p.add_argument("--auth-key", type=Path, help="this site's private key (its .pub is registered by the coordinator)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    dp = p.add_argument_group("differential privacy (the site's own budget)")
    dp.add_argument("--epsilon", type=float, help="privacy budget over the site's whole life; enables DP-SGD")
    dp.add_argument("--delta", type=float, help="delta of (epsilon, delta)-DP (default 1e-5)")
    dp.add_argument("--max-grad-norm", type=float, help="per-sample gradient clipping bound (default 1.0)")
    dp.add_argument("--dp-accountant", choices=("rdp", "prv"), help="privacy accountant (default rdp)")
    dp.add_argument(
        "--dp-planned-rounds", type=int, help="rounds to calibrate noise for (default: the coordinator's plan)"
    )
    p.add_argument("--insecure", action="store_true", help="no TLS (never with patient data)")
    p.add_argument(
        "--max-restarts", type=int, help="stop after restarting the SuperNode this often (default: never stop)"
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
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def merged_options(args: argparse.Namespace) -> dict:
    """Flags over the config file's values."""
    options = {}
    if args.config:
        try:
            options = tomllib.loads(args.config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise SiteConfigError(f"--config {args.config}: {e}") from e
        options = {k.replace("-", "_"): v for k, v in options.items()}
        unknown = set(options) - set(vars(args)) | ({"config"} & set(options))
        if unknown:
            raise SiteConfigError(f"--config {args.config}: unknown options {sorted(unknown)}")
    options.update({k: v for k, v in vars(args).items() if v not in (None, False)})
    return options


def site_config(options: dict) -> dict[str, str]:
    """The site's settings as node-config keys (paths made absolute: the SuperNode runs elsewhere)."""
    config = {}
    for option in (
        "dataset",
        "data",
        "site",
        "name",
        "state_dir",
        "device",
        "epsilon",
        "delta",
        "max_grad_norm",
        "dp_accountant",
        "dp_planned_rounds",
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


def run(options: dict) -> int:
    for required in ("server", "dataset", "state_dir"):
        if not options.get(required):
            raise SiteConfigError(f"--{required.replace('_', '-')} is required")
    secure = not options.get("insecure")
    if secure and not (options.get("root_cert") and options.get("auth_key")):
        raise SiteConfigError(
            "TLS and site authentication need --root-cert and --auth-key (or pass --insecure explicitly)"
        )
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
        str(Path(sys.executable).with_name("flower-supernode")),
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
        return supervise(args, env, state_dir, options.get("max_restarts"))
    finally:
        runner.stop()


def supervise(args: list[str], env: dict[str, str], state_dir: Path, max_restarts: int | None) -> int:
    """Run the SuperNode until we are stopped, restarting it (with backoff) whenever it exits.

    A SuperNode gives up when the coordinator is unreachable for a while or has not
    registered this site's key yet; a hospital's service should wait for the coordinator,
    not die. ``max_restarts`` bounds that (tests, cron jobs).
    """
    pid_file, log_file = state_dir / "supernode.pid", state_dir / "supernode.log"
    restarts, backoff = 0, 2.0
    while True:
        supernode = start_child(args, log_file, pid_file, env)
        log.info("SuperNode started (pid %d); log in %s", supernode.pid, log_file)
        started = time.monotonic()
        try:
            code = supernode.wait()
        finally:
            stop_child(supernode, pid_file)
        if max_restarts is not None and restarts >= max_restarts:
            log.error("SuperNode exited with code %d; giving up after %d restarts (see %s)", code, restarts, log_file)
            return code or 1
        backoff = 2.0 if time.monotonic() - started > 300 else min(backoff * 2, 60.0)
        log.warning("SuperNode exited with code %d (see %s); restarting in %.0f s", code, log_file, backoff)
        time.sleep(backoff)
        restarts += 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    logging.getLogger("hymate-client").setLevel(logging.INFO)
    try:
        return run(merged_options(args))
    except (SiteConfigError, DataError, LedgerError, ValueError, OSError) as e:
        print(f"hymate-client: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
