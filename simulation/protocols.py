"""Experiment protocols over virtual hospitals: who trains on what, and who is tested where.

- ``centralized``: one model on the pooled training stays of all sites (the upper reference);
- ``local``: one model per site on its own stays, tested on every site (the heat map);
- ``federated``: the project's ServerApp/ClientApp on Flower's Simulation Engine;
- ``loso``: leave one site out: federate on the others, test on the held-out one;
- ``personalized``: the federated model fine-tuned briefly on each site, tested there;
- ``fedbn``: federated with each site keeping its own normalisation layers (FedBN), each site
  tested with the shared weights and its own normalisation.

All protocols share one partition and one patient-level split per site (train/val/test), so
every number in results.csv is measured on the same test stays.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from client.local_norms import load_local_norms
from client.site import DPSettings
from hymate.centralized import train_centralized
from hymate.data import DEFAULT_CACHE_DIR, DataError, concat_tables, load_dataset, split_stays
from hymate.data.batches import StayDataset, make_loader
from hymate.data.stays import StayTable
from hymate.model import HyMaTE, ModelOptions
from hymate.model_bundle import ModelBundle, initial_weights
from hymate.settings_fields import config_key, run_config_of
from hymate.train import TrainConfig, fit, positive_class_weight
from server.round_selection import RoundSelection
from server.run_dir import RunDirectory
from server.secure_aggregation import SecureAggregationSettings
from server.settings import fixed_class_weight
from simulation.engine import EngineSettings, simulate_federation
from simulation.evaluation import Predictions, metric_rows, predict, variable_importance
from simulation.partitioners import PartitionScheme, partition_stays
from strategies.registry import StrategySpec

log = logging.getLogger(__name__)

PROTOCOLS = ("centralized", "local", "federated", "loso", "personalized", "fedbn")


@dataclass(frozen=True)
class SimulationSpec:
    out: Path
    dataset: str = "synthetic"
    data: Path | None = None
    dataset_options: dict = field(default_factory=dict)
    cache_dir: Path | None = DEFAULT_CACHE_DIR  # parsed-data cache of the simulator and every site; None: none
    partition: PartitionScheme = field(default_factory=lambda: PartitionScheme("natural"))
    sites: int = 4
    min_site_size: int = 20
    protocols: tuple[str, ...] = ("federated",)
    strategy: StrategySpec = field(default_factory=StrategySpec)
    rounds: int = 5
    local_epochs: int = 1
    personalize_epochs: int = 3
    seeds: tuple[int, ...] = (0,)
    split_seed: int = 0
    model: ModelOptions = field(default_factory=ModelOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineSettings = field(default_factory=EngineSettings)
    bootstrap: int = 200
    privacy: DPSettings | None = None  # DP settings of every virtual site (None: no DP)
    min_sites: int | None = None  # sites that must reply in a federated round (default: all)
    secure_aggregation: SecureAggregationSettings = field(default_factory=SecureAggregationSettings)
    init_from: str = ""  # a checkpoint every protocol starts from (absolute path; empty: random weights)
    selection: RoundSelection = field(default_factory=RoundSelection)  # which round a federation keeps
    lr_schedule: str = "constant"  # a federation's learning rate over its rounds: "constant" or "cosine"
    # The positive class weight: a federation's from all sites' counts ("federation") or each "site"'s own,
    # and the training labels' in centralized, local and personalised training; "none" everywhere: unweighted.
    class_weight: str = "federation"
    keep_optimizer_state: bool = False  # every site continues its optimiser's state from round to round
    # Each site's split is stratified by label, so its val and test splits hold both classes
    # whenever it has three patients of each. One with fewer (a natural unit with two deaths, a
    # label-skewed virtual site) cannot: a loud warning carried into results.csv, sites.csv and
    # the report, or with this an error.
    require_both_classes: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.protocols) - set(PROTOCOLS)
        if unknown:
            raise ValueError(f"unknown protocol(s) {sorted(unknown)}; valid: {', '.join(PROTOCOLS)}")

    def load_options(self) -> dict:
        """``load_dataset`` keywords, the same for the simulator and each virtual site's ClientApp
        (they travel in its manifest, so JSON types: the cache folder as an absolute path)."""
        cache_dir = str(Path(self.cache_dir).resolve()) if self.cache_dir is not None else None
        return dict(self.dataset_options) | {"cache_dir": cache_dir}


@dataclass(frozen=True)
class SiteSplit:
    train: StayTable
    val: StayTable
    test: StayTable


@dataclass
class ExperimentResult:
    rows: list[dict] = field(default_factory=list)
    federated_runs: dict[str, Path] = field(default_factory=dict)  # label -> run dir
    # (protocol, seed) -> the predictions on the pooled test stays of the model trained on every
    # site, in one fixed stay order: what paired comparisons between runs need.
    pooled_predictions: dict[tuple[str, int], Predictions] = field(default_factory=dict)
    importance: dict[str, float] = field(default_factory=dict)
    variables: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)  # splits allowed without both classes


class Experiment:
    """One dataset, partitioned into sites and split per site, run under the spec's protocols."""

    def __init__(self, spec: SimulationSpec):
        self.spec = spec
        self.table = load_dataset(spec.dataset, spec.data, **spec.load_options())
        if spec.init_from:  # a checkpoint of another vocabulary or shape fails here, before any training
            initial_weights(spec.init_from, spec.model, self.table.variables, self.table.static_names)
        rows = partition_stays(
            self.table, spec.partition, spec.sites, seed=spec.split_seed, min_size=spec.min_site_size
        )
        self.site_rows = rows
        self.result = ExperimentResult(variables=self.table.variables)
        self.one_class: dict[str, dict[str, str]] = {}  # site -> split name -> why it lacks a class
        self.sites: dict[str, SiteSplit] = {name: self._split_site(name, index) for name, index in rows.items()}
        self._bundles: dict[int, ModelBundle] = {}

    def _split_site(self, name: str, index: np.ndarray) -> SiteSplit:
        """The site's own split, stratified by label over the site's stays (a virtual site's
        stays keep their source hospital in ``sites``; that must not stratify the split)."""
        spec = self.spec
        site_table = self.table.subset(index)
        try:
            split = split_stays(
                site_table, seed=spec.split_seed, require_both_classes=spec.require_both_classes, site=name
            )
        except DataError as e:
            remedy = (
                "the natural partition's sites are the data's own: use another partition (e.g. --partition iid "
                "--sites 2)"
                if spec.partition.kind == "natural"
                else "use fewer --sites, a larger ALPHA or another --partition"
            )
            raise DataError(
                f"{e}. {remedy}, or leave out --require-both-classes to run anyway "
                "(that site's metrics are then flagged in results.csv and report.md)"
            ) from e
        if split.one_class:
            self.one_class[name] = split.one_class
            self.result.warnings += list(split.one_class.values())
        return SiteSplit(*split.tables(site_table))

    # -- helpers --------------------------------------------------------------------

    def _score(self, model: HyMaTE, normalizer, table: StayTable, seed: int, test_site: str, **keys) -> Predictions:
        """Predict ``table`` on the requested device and add its metric rows: the one scoring
        path of every protocol. Rows of a test split without both classes carry its warning."""
        p = predict(model, normalizer, table, self.spec.train.max_events, self.spec.train.device)
        warning = self.one_class.get(test_site, {}).get("test", "")
        self.result.rows += metric_rows(
            p,
            n_resamples=self.spec.bootstrap,
            bootstrap_seed=seed,
            seed=seed,
            test_site=test_site,
            warning=warning,
            **keys,
        )
        return p

    def _pooled(self, part: str, names: list[str] | None = None) -> StayTable:
        names = names or list(self.sites)
        return concat_tables([getattr(self.sites[n], part) for n in names], name=f"{self.table.name}-{part}")

    def _score_everywhere(
        self, model: HyMaTE, normalizer, seed: int, protocol: str, strategy: str, train_sites: str
    ) -> None:
        tests = {name: s.test for name, s in self.sites.items()} | {"pooled": self._pooled("test")}
        for test_site, table in tests.items():
            predictions = self._score(
                model, normalizer, table, seed, test_site, protocol=protocol, strategy=strategy, train_sites=train_sites
            )
            if test_site == "pooled" and train_sites == "all":
                self.result.pooled_predictions[protocol, seed] = predictions

    def _train_config(self, seed: int) -> TrainConfig:
        return dataclasses.replace(self.spec.train, seed=seed, pos_weight=fixed_class_weight(self.spec.class_weight))

    # -- protocols ------------------------------------------------------------------

    def centralized(self, seed: int) -> None:
        result = train_centralized(
            self._pooled("train"),
            self._pooled("val"),
            {},
            self.spec.model,
            self._train_config(seed),
            self.spec.init_from,
        )
        self._score_everywhere(result.model, result.normalizer, seed, "centralized", "pooled", "all")
        self._remember_importance(result.model, result.normalizer)

    def local(self, seed: int) -> None:
        for name in tqdm(self.sites, desc=f"local (seed {seed}): sites", unit="site"):
            site = self.sites[name]
            result = train_centralized(
                site.train, site.val, {}, self.spec.model, self._train_config(seed), self.spec.init_from
            )
            self._score_everywhere(result.model, result.normalizer, seed, "local", "local", name)

    def federated(self, seed: int) -> None:
        bundle = self._federate(seed, list(self.sites), f"federated-seed{seed}")
        self._bundles[seed] = bundle
        self._score_everywhere(bundle.build(), bundle.normalizer, seed, "federated", self.spec.strategy.name, "all")
        self._remember_importance(bundle.build(), bundle.normalizer)

    def loso(self, seed: int) -> None:
        for held_out in self.sites:
            others = [n for n in self.sites if n != held_out]
            bundle = self._federate(seed, others, f"loso-{held_out}-seed{seed}")
            self._score(
                bundle.build(),
                bundle.normalizer,
                self.sites[held_out].test,
                seed,
                held_out,
                protocol="loso",
                strategy=self.spec.strategy.name,
                train_sites=f"all-but-{held_out}",
            )

    def personalized(self, seed: int) -> None:
        bundle = self._bundles.get(seed) or self._federate(seed, list(self.sites), f"federated-seed{seed}")
        self._bundles[seed] = bundle
        config = dataclasses.replace(
            self._train_config(seed), epochs=self.spec.personalize_epochs, patience=self.spec.personalize_epochs
        )
        for name, site in tqdm(self.sites.items(), desc=f"personalized (seed {seed}): sites", unit="site"):
            torch.manual_seed(seed)
            model = bundle.build()
            train = make_loader_for(site.train, bundle, config, shuffle=True)
            val = make_loader_for(site.val, bundle, config, shuffle=False)
            fit(model, train, val, config, config.pos_weight or positive_class_weight(site.train.labels))
            self._score(
                model,
                bundle.normalizer,
                site.test,
                seed,
                name,
                protocol="personalized",
                strategy=self.spec.strategy.name,
                train_sites=f"all+{name}",
            )

    def fedbn(self, seed: int) -> None:
        label = f"fedbn-seed{seed}"
        bundle = self._federate(seed, list(self.sites), label, local_norms=True)
        for name, site in self.sites.items():
            model = bundle.build()
            if not load_local_norms(model, RunDirectory(self.result.federated_runs[label]).site_state_root / name):
                raise RuntimeError(f"site {name} kept no normalisation layers in {label}")
            self._score(
                model,
                bundle.normalizer,
                site.test,
                seed,
                name,
                protocol="fedbn",
                strategy=self.spec.strategy.name,
                train_sites=f"all+{name}",
            )

    # -- federation -----------------------------------------------------------------

    def _federate(self, seed: int, names: list[str], label: str, local_norms: bool = False) -> ModelBundle:
        spec = self.spec
        run_config = (
            {
                "local-norms": local_norms,
                "strategy": spec.strategy.name,
                "strategy-options": spec.strategy.as_string(),
                "num-server-rounds": spec.rounds,
                "local-epochs": spec.local_epochs,
                "batch-size": spec.train.batch_size,
                "learning-rate": spec.train.learning_rate,
                "optimizer": spec.train.optimizer,
                "momentum": spec.train.momentum,
                "weight-decay": spec.train.weight_decay,
                "clip-grad-norm": spec.train.clip_grad_norm,
                "max-events": spec.train.max_events,
                "seed": seed,
                **{config_key(f): getattr(spec.model, f.name) for f in dataclasses.fields(ModelOptions)},
                "init-from": spec.init_from,
                "freeze": spec.train.freeze,
                "class-weight": spec.class_weight,
                "lr-schedule": spec.lr_schedule,
                "keep-optimizer-state": spec.keep_optimizer_state,
            }
            | run_config_of(spec.secure_aggregation)
            | run_config_of(spec.selection)
        )
        partitions = {n: [str(s) for s in self.table.stay_ids[self.site_rows[n]]] for n in names}
        run_dir = spec.out / "runs" / label
        with tqdm(total=spec.rounds, desc=f"{label}: rounds ({len(names)} sites)", unit="round") as bar:
            runs = simulate_federation(
                spec.dataset,
                str(spec.data) if spec.data else None,
                spec.load_options(),
                partitions,
                run_config,
                run_dir,
                spec.engine,
                split_seed=spec.split_seed,
                privacy=dataclasses.asdict(spec.privacy) if spec.privacy else None,
                min_sites=spec.min_sites,
                on_progress=_progress(bar),
            )
        self.result.federated_runs[label] = runs.path
        return runs.load_model()

    def _remember_importance(self, model: HyMaTE, normalizer) -> None:
        scores = variable_importance(model, normalizer, self._pooled("test"), self.spec.train.max_events)
        self.result.importance = dict(zip(self.table.variables, (float(x) for x in scores), strict=True))

    def run(self) -> ExperimentResult:
        order = [p for p in PROTOCOLS if p in self.spec.protocols]
        for seed in self.spec.seeds:
            for protocol in order:
                log.info("protocol %s, seed %d", protocol, seed)
                getattr(self, protocol)(seed)
        return self.result


def make_loader_for(table: StayTable, bundle: ModelBundle, config: TrainConfig, shuffle: bool) -> DataLoader:
    return make_loader(
        StayDataset(table, bundle.normalizer, config.max_events), config.batch_size, shuffle, config.seed
    )


def _progress(bar: tqdm) -> Callable[[list[int]], None]:
    def update(done: list[int]) -> None:
        if done and done[-1] > bar.n:
            bar.update(done[-1] - bar.n)

    return update


def site_summary(experiment: Experiment) -> list[dict]:
    """Per-site sizes, each split's own positives, and prevalence (what a reader needs to judge
    per-site metrics), with the warning of any split allowed without both classes."""
    return [
        {
            "site": name,
            "stays": len(s.train) + len(s.val) + len(s.test),
            "train": len(s.train),
            "val": len(s.val),
            "test": len(s.test),
            "train positives": int(s.train.labels.sum()),
            "val positives": int(s.val.labels.sum()),
            "test positives": int(s.test.labels.sum()),
            "prevalence": float(np.mean(np.concatenate([s.train.labels, s.val.labels, s.test.labels]))),
            "warning": "; ".join(experiment.one_class.get(name, {}).values()),
        }
        for name, s in experiment.sites.items()
    ]
