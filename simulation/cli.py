"""``hymate-sim``: simulate a federation of hospitals on one machine (or a Ray cluster).

hymate-sim                                             federated, synthetic data, report in runs/sim
hymate-sim --dataset physionet2012 --data DIR --protocol all --out runs/p12
hymate-sim --dataset physionet2012 --data DIR --sets a --no-cache   only set-a, parsed afresh
hymate-sim --dataset physionet2012 --vocabulary shared --init-from runs/pretrain/p19/pretrained.pt --freeze embeddings
hymate-sim --partition dirichlet:0.5 --sites 6 --strategy fedprox --strategy-option proximal_mu=0.01
hymate-sim --ray-address 10.0.0.5:6379 ...             on an existing Ray cluster (or set RAY_ADDRESS)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import pandas as pd

from client.site import DPSettings, add_dp_flags, dp_settings_from
from hymate.cli_options import add_deprecated_alias, parse_with_config_file
from hymate.data import DEFAULT_CACHE_DIR, DataError, VocabularyChoice
from hymate.model import ModelOptions
from hymate.model_bundle import Initialisation
from hymate.settings_fields import add_flags, flag_values
from hymate.train import TRAIN_FLAGS, TrainConfig
from server.round_selection import RoundSelection
from server.secure_aggregation import SecureAggregationSettings
from server.settings import ServerSettings
from simulation.engine import EngineSettings, SimulationError
from simulation.partitioners import PartitionError, PartitionScheme
from simulation.protocols import PROTOCOLS, Experiment, SimulationSpec, site_summary
from simulation.report import results_frame, write_report
from strategies.registry import StrategyError, StrategySpec, build_strategy, check_secure_aggregation


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hymate-sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = p.add_argument_group("data and sites")
    data.add_argument("--dataset", default="synthetic", help="synthetic (generated, default), physionet2012, ...")
    data.add_argument("--data", type=Path, help="folder with the dataset's raw files (not for synthetic)")
    data.add_argument(
        "--sets", help="PhysioNet sets to load, comma-separated: a,b,c (physionet2012) or A,B (physionet2019)"
    )
    data.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help=f"parsed-data cache (default {DEFAULT_CACHE_DIR})"
    )
    data.add_argument("--no-cache", action="store_true", help="parse the raw files on every load, cache nothing")
    data.add_argument("--partition", default="natural", help="natural | iid | dirichlet:ALPHA | quantity:ALPHA")
    data.add_argument("--sites", type=int, default=4, help="number of virtual hospitals (not for natural)")
    data.add_argument("--min-site-size", type=int, default=20, help="fewest stays a site may hold")
    data.add_argument(
        "--require-both-classes",
        action="store_true",
        help="stop when a site's val or test split lacks a class (default: run, flagged in results.csv and the report)",
    )
    add_flags(data, VocabularyChoice)
    data.add_argument("--synthetic-sites", type=int, help="sites the synthetic generator makes (default 4)")
    data.add_argument("--synthetic-stays", type=int, help="stays per synthetic site (default 500)")
    run = p.add_argument_group("protocols")
    run.add_argument(
        "--protocol", action="append", help=f"{', '.join(PROTOCOLS)} or all (repeatable; default federated)"
    )
    run.add_argument("--strategy", default="fedavg", help="aggregation strategy name or module:Class")
    run.add_argument("--strategy-option", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--rounds", type=int, default=5)
    run.add_argument("--local-epochs", type=int, default=1)
    run.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="training seeds (partition and splits stay fixed)"
    )
    run.add_argument("--split-seed", type=int, default=0, help="seed of the partition and the per-site splits")
    run.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the 95 %% intervals")
    run.add_argument("--min-sites", type=int, help="sites that must reply in each federated round (default: all)")
    add_flags(run, RoundSelection)
    add_flags(run, ServerSettings, ("lr_schedule", "class_weight", "keep_optimizer_state"))
    add_dp_flags(p.add_argument_group("differential privacy at every virtual site"))
    add_flags(p.add_argument_group("model"), ModelOptions)
    add_flags(p.add_argument_group("model"), Initialisation)
    add_flags(p.add_argument_group("local training"), TrainConfig, TRAIN_FLAGS)
    add_flags(p.add_argument_group("secure aggregation (Flower's SecAgg+)"), SecureAggregationSettings)
    add_deprecated_alias(p, "--lr", "--learning-rate")
    engine = p.add_argument_group("simulation engine")
    engine.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"), help="existing Ray cluster HOST:PORT")
    engine.add_argument("--cpus-per-client", type=int, default=1)
    engine.add_argument("--timeout", type=float, default=3600.0, help="seconds before a federated run is abandoned")
    p.add_argument(
        "--out", type=Path, help="output folder for report, results and plots (default: a new runs/sim/YYYYmmdd-HHMMSS)"
    )
    p.add_argument("--config", type=Path, help="TOML file with any of these options (flags win)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def output_folder(requested: Path | None) -> Path:
    """A fresh folder: a new time-stamped one by default, so running the same command twice
    keeps both reports; a named folder that already holds a simulation is refused, untouched."""
    if requested is None:
        return Path("runs/sim") / time.strftime("%Y%m%d-%H%M%S")
    if (requested / "report.md").exists() or (requested / "runs").exists():
        raise ValueError(f"{requested} already holds a simulation; choose another --out (nothing there was changed)")
    return requested


def spec_from_args(args: argparse.Namespace) -> SimulationSpec:
    protocols = args.protocol or ["federated"]
    protocols = list(PROTOCOLS) if "all" in protocols else [x for item in protocols for x in item.split(",")]
    strategy = StrategySpec.parse(args.strategy, args.strategy_option)
    build_strategy(strategy, 1)  # an unknown strategy or option fails here, before any training
    secure = SecureAggregationSettings(**flag_values(SecureAggregationSettings, args))
    if secure.enabled:
        check_secure_aggregation(strategy)
    return SimulationSpec(
        out=output_folder(args.out),
        dataset=args.dataset,
        data=args.data,
        dataset_options=dataset_options(args),
        cache_dir=None if args.no_cache else args.cache_dir,
        partition=PartitionScheme.parse(args.partition),
        sites=args.sites,
        min_site_size=args.min_site_size,
        require_both_classes=args.require_both_classes,
        protocols=tuple(protocols),
        strategy=strategy,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        seeds=tuple(args.seeds),
        split_seed=args.split_seed,
        bootstrap=args.bootstrap,
        model=ModelOptions(**flag_values(ModelOptions, args)),
        train=TrainConfig(**flag_values(TrainConfig, args, TRAIN_FLAGS)),
        init_from=str(Path(args.init_from).resolve()) if args.init_from else "",
        engine=EngineSettings(cpus_per_client=args.cpus_per_client, ray_address=args.ray_address, timeout=args.timeout),
        privacy=privacy_settings(args),
        min_sites=args.min_sites,
        secure_aggregation=secure,
        selection=RoundSelection(**flag_values(RoundSelection, args)),
        class_weight=args.class_weight,
        lr_schedule=args.lr_schedule,
        keep_optimizer_state=args.keep_optimizer_state,
    )


# Datasets that come in sets, and how their set names are written.
_SET_CASE = {"physionet2012": str.lower, "physionet2019": str.upper}


def dataset_options(args: argparse.Namespace) -> dict:
    """The source options the flags ask for (the loader validates the values)."""
    options = {}
    if args.dataset == "synthetic":
        options = {k: v for k, v in (("n_sites", args.synthetic_sites), ("stays_per_site", args.synthetic_stays)) if v}
    if args.vocabulary != "source":
        options["vocabulary"] = args.vocabulary
    if args.sets is not None:
        if args.dataset not in _SET_CASE:
            raise ValueError(f"--sets applies to {' and '.join(_SET_CASE)}, not to --dataset {args.dataset}")
        options["sets"] = [_SET_CASE[args.dataset](s.strip()) for s in args.sets.split(",") if s.strip()]
    return options


def privacy_settings(args: argparse.Namespace) -> DPSettings | None:
    """Every virtual site's DP settings (checked now, before any training), or None without --dp-epsilon."""
    return dp_settings_from(vars(args))


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_with_config_file(build_parser(), argv)
    except ValueError as e:
        print(f"hymate-sim: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    start = time.perf_counter()
    try:
        spec = spec_from_args(args)
        spec.engine.check_cluster()
        experiment = Experiment(spec)
        result = experiment.run()
    except (DataError, PartitionError, StrategyError, SimulationError, ValueError, FileNotFoundError) as e:
        print(f"hymate-sim: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The engine's SuperLink (and the Ray workers under it) were stopped on the way out.
        print(
            "hymate-sim: interrupted; the simulation was stopped (its partial output stays in place)", file=sys.stderr
        )
        return 130
    results = results_frame(result.rows)
    setup = {
        "dataset": f"{spec.dataset} ({len(experiment.table)} stays, {len(experiment.table.variables)} variables)",
        "sites": f"{len(experiment.sites)} ({args.partition} partition)",
        "protocols": ", ".join(spec.protocols),
        "strategy": f"{spec.strategy.name} {spec.strategy.as_string()}".strip(),
        "rounds x local epochs": f"{spec.rounds} x {spec.local_epochs}",
        "vocabulary": args.vocabulary,
        "initial weights": f"{spec.init_from} (freeze: {spec.train.freeze})" if spec.init_from else "random",
        "seeds": ", ".join(map(str, spec.seeds)),
        "differential privacy": (
            f"epsilon {spec.privacy.epsilon:g}, delta {spec.privacy.delta:g} per site" if spec.privacy else "off"
        ),
        "wall time": f"{time.perf_counter() - start:.0f} s",
    }
    report = write_report(
        spec.out,
        "HyMaTE-FL simulation report",
        setup,
        results,
        pd.DataFrame(site_summary(experiment)),
        result.federated_runs,
        result.importance,
        warnings=result.warnings,
    )
    pooled = results[(results["test_site"] == "pooled") & (results["metric"].isin(["auroc", "auprc"]))]
    for (protocol, metric), group in pooled.groupby(["protocol", "metric"]):
        print(f"{protocol:>12} pooled test {metric.upper()}: {group['value'].mean():.4f}")
    if result.warnings:
        print(
            f"hymate-sim: warning: {len(result.warnings)} val/test splits lack a class; their AUROC/AUPRC are "
            f"undefined (flagged in results.csv and {report.name}):",
            *result.warnings,
            sep="\n  ",
            file=sys.stderr,
        )
    print(f"report: {report} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
