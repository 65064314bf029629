"""``hymate-server``: the coordinator's command.

    hymate-server init-certs DIR --host H               CA and server certificate (sites make their own keys)
    hymate-server --run-dir runs/fed --rounds 5 --strategy fedavg --config federation.toml \\
        --ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key \\
        --site-keys DIR/sites                             run a federation (TLS + node auth)
    hymate-server ... --resume                          continue after a crash

It starts a Flower SuperLink (TLS and SuperNode authentication on unless ``--insecure``),
registers the sites' public keys, starts the ServerApp with ``flwr run`` and waits for it,
then stops what it started. Settings are checked before anything starts.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import tomli_w

from hymate.cli_options import parse_with_config_file
from hymate.model import ModelOptions
from hymate.model_bundle import Initialisation, ModelBundle
from hymate.processes import free_port
from hymate.settings_fields import add_flags, flag_config
from server.app_source import AppSourceError, staged_app
from server.certs import create_federation_keys
from server.events import ConsoleProgress
from server.round_selection import RoundSelection
from server.run_dir import RunDirectory, RunDirError
from server.secure_aggregation import SecureAggregationSettings
from server.settings import ServerSettings, SettingsError
from server.superlink import SuperLink, SuperLinkError, TLSFiles
from strategies.registry import StrategyError, build_strategy

log = logging.getLogger("hymate-server")

# The ServerSettings fields hymate-server has flags for (the rest: --strategy-option, --run-dir, --site-keys).
RUN_FLAGS = (
    "strategy_name",
    "rounds",
    "min_clients",
    "min_connected",
    "resume",
    "round_timeout",
    "wait_for_clients",
    "local_epochs",
    "batch_size",
    "learning_rate",
    "optimizer",
    "momentum",
    "weight_decay",
    "clip_grad_norm",
    "max_events",
    "seed",
    "local_norms",
    "keep_optimizer_state",
    "freeze",
    "lr_schedule",
    "class_weight",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hymate-server",
        description="Coordinate a HyMaTE federation (subcommand init-certs creates the CA and server certificate).",
    )
    p.add_argument("--config", type=Path, help="TOML file with any of these options (flags win)")
    p.add_argument("--run-dir", type=Path, help="checkpoints, logs, final model and model card (required)")
    federation = p.add_argument_group("federation and local training")
    add_flags(federation, ServerSettings, RUN_FLAGS)
    add_flags(federation, RoundSelection)
    federation.add_argument(
        "--strategy-option", action="append", default=[], metavar="KEY=VALUE", help="strategy option (repeatable)"
    )
    add_flags(p.add_argument_group("model"), ModelOptions)
    add_flags(p.add_argument_group("secure aggregation (Flower's SecAgg+)"), SecureAggregationSettings)
    add_flags(p.add_argument_group("model"), Initialisation)
    net = p.add_argument_group("network and security")
    net.add_argument(
        "--address",
        default="0.0.0.0:9093",
        help="HOST:PORT the SuperLink listens on (default 0.0.0.0:9093: every interface, so sites can reach it; "
        "TLS and site authentication are on unless --insecure)",
    )
    net.add_argument("--ssl-ca-certfile", type=Path)
    net.add_argument("--ssl-certfile", type=Path)
    net.add_argument("--ssl-keyfile", type=Path)
    net.add_argument(
        "--site-keys", type=Path, action="append", default=[], help="a site's .pub key, or a folder of them"
    )
    net.add_argument(
        "--insecure", action="store_true", help="no TLS and no site authentication (never with patient data)"
    )
    p.add_argument(
        "--timeout", type=float, default=24 * 3600.0, help="give up on the whole run after this many seconds"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    commands = p.add_subparsers(dest="command", metavar="init-certs")
    add_certs_parser(commands)
    return p


def add_certs_parser(commands) -> None:
    p = commands.add_parser(
        "init-certs",
        help="create the CA and the coordinator's TLS certificate",
        description="Create a CA and the coordinator's TLS certificate. Each hospital creates its own key pair "
        "with `hymate-client init-key` and sends only the .pub file.",
    )
    p.add_argument("directory", type=Path)
    p.add_argument(
        "--host",
        action="append",
        default=[],
        required=True,
        help="host name or IP the sites connect to (repeatable; the server certificate is valid for these)",
    )
    pilot = p.add_argument_group("PILOT ONLY (never with patient data)")
    pilot.add_argument(
        "--pilot-site-keys",
        type=int,
        default=0,
        metavar="N",
        help="PILOT ONLY: also write key pairs for site-1 .. site-N into DIR/sites; the coordinator then holds "
        "the sites' private keys, so never use them with patient data",
    )


def run_config(args: argparse.Namespace) -> dict:
    """The [tool.flwr.app.config] overrides for this run, keyed as ServerSettings derives them."""
    init_from = args.init_from and str(Path(args.init_from).resolve())  # the ServerApp runs elsewhere
    return (
        flag_config(ServerSettings, args, RUN_FLAGS)
        | flag_config(RoundSelection, args)
        | flag_config(ModelOptions, args)
        | flag_config(SecureAggregationSettings, args)
        | {"init-from": init_from}
        | {"strategy-options": " ".join(args.strategy_option), "run-dir": str(args.run_dir.resolve())}
    )


def site_public_keys(paths: list[Path]) -> dict[str, Path]:
    """Site name (the file's stem) -> its .pub file. A site's name is its identity for the whole
    run, so two files with one name, or one key under two names, are start-up errors."""
    keys: dict[str, Path] = {}
    names_of_key: dict[str, str] = {}
    for path in paths:
        found = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        if not found or not all(f.is_file() for f in found):
            raise SettingsError(f"--site-keys {path}: no .pub key file there")
        for f in found:
            name = f.stem
            if not name or any(c.isspace() for c in name):
                raise SettingsError(f"--site-keys {f}: a site name (the file name before .pub) must be one word")
            if name in keys:
                raise SettingsError(f"--site-keys: two keys for site {name}: {keys[name]} and {f}")
            key = " ".join(f.read_text(errors="replace").split()[:2])  # type and key, without the comment
            if key in names_of_key:
                raise SettingsError(
                    f"--site-keys {f}: the same public key is already registered as {names_of_key[key]} ({keys[names_of_key[key]]})"
                )
            keys[name] = f
            names_of_key[key] = name
    return keys


def tls_files(args: argparse.Namespace) -> TLSFiles | None:
    if args.insecure:
        log.warning("=" * 72)
        log.warning("INSECURE: no TLS, no site authentication. Never use this with patient data.")
        log.warning("=" * 72)
        return None
    missing = [f for f in ("ssl_ca_certfile", "ssl_certfile", "ssl_keyfile") if getattr(args, f) is None]
    if missing:
        raise SettingsError(
            f"TLS needs --{' --'.join(m.replace('_', '-') for m in missing)} (create them with `hymate-server init-certs`), "
            "or pass --insecure explicitly"
        )
    for f in ("ssl_ca_certfile", "ssl_certfile", "ssl_keyfile"):
        if not getattr(args, f).is_file():
            raise SettingsError(f"--{f.replace('_', '-')} {getattr(args, f)}: no such file")
    return TLSFiles(args.ssl_ca_certfile.resolve(), args.ssl_certfile.resolve(), args.ssl_keyfile.resolve())


def run(args: argparse.Namespace) -> int:
    if args.run_dir is None:
        raise SettingsError("--run-dir is required")
    tls = tls_files(args)
    keys = site_public_keys(args.site_keys) if tls else {}
    if tls and not keys:
        raise SettingsError("site authentication is on: pass --site-keys with the sites' public keys")
    config = run_config(args) | {"registered-sites": " ".join(sorted(keys))}
    settings = ServerSettings.from_run_config(config)  # validates every value before anything starts
    if settings.initialisation.init_from:  # readable now; its vocabulary is checked once the sites answer
        try:
            ModelBundle.load(Path(settings.initialisation.init_from))
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise SettingsError(f"--init-from {args.init_from}: not a readable model file ({e})") from None
    build_strategy(settings.strategy, settings.min_clients)
    run_dir = RunDirectory(args.run_dir)
    run_dir.prepare(resume=args.resume)
    host, _, port = args.address.rpartition(":")
    superlink = SuperLink(run_dir.superlink_dir, host or "127.0.0.1", int(port or free_port()), tls)
    config_file = run_dir.superlink_run_config_file
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(tomli_w.dumps(config))
    progress = ConsoleProgress(run_dir.events_file)
    try:
        superlink.start()
        for name, key in keys.items():
            superlink.register(key, name)
        with staged_app() as app:
            run_id = superlink.run_app(app, config_file)
        log.info("run %s started: %d rounds of %s; logs in %s", run_id, args.rounds, args.strategy, args.run_dir)
        card = run_dir.model_card_file
        card_before = card.stat().st_mtime if card.exists() else 0.0
        status = superlink.wait_for_run(
            run_id,
            args.timeout,
            on_poll=progress.show_new,
            finished_hint=lambda: card.exists() and card.stat().st_mtime > card_before,
        )
        progress.show_new()
        if status != "finished:completed":
            print(superlink.run_log(run_id)[-4000:], file=sys.stderr)
            print(f"hymate-server: run {run_id} ended as {status}", file=sys.stderr)
            return 1
    finally:
        superlink.stop()
    print(f"federation finished: {args.rounds} rounds; model and model card in {args.run_dir}")
    return 0


def init_certs(args: argparse.Namespace) -> int:
    if args.pilot_site_keys < 0:
        raise SettingsError(f"--pilot-site-keys {args.pilot_site_keys}: must be 0 or more")
    sites = [f"site-{i}" for i in range(1, args.pilot_site_keys + 1)]
    keys = create_federation_keys(args.directory, sites, args.host)
    print(f"CA: {keys.ca_cert} (give to every site; keep {keys.ca_cert.with_suffix('.key')} offline)")
    print(f"server certificate: {keys.server_cert} (key {keys.server_key}) for {', '.join(args.host)}")
    if keys.site_keys:
        print("PILOT ONLY: site keys made by the coordinator; never use them with patient data")
    for site, path in keys.site_keys.items():
        print(f"PILOT ONLY: site {site}: private key {path}, public key {path}.pub (register with --site-keys)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_with_config_file(parser, argv, SettingsError)
    except SettingsError as e:
        print(f"hymate-server: error: {e}", file=sys.stderr)
        return 2
    if args.command == "init-certs":
        try:
            return init_certs(args)
        except (SettingsError, ValueError, OSError) as e:
            print(f"hymate-server init-certs: error: {e}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    logging.getLogger("hymate-server").setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the SuperLink is stopped on the way out
    try:
        return run(args)
    except (SettingsError, StrategyError, RunDirError, SuperLinkError, AppSourceError, ValueError) as e:
        print(f"hymate-server: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
