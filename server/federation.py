"""The coordinator's round loop: normalise, then train, screen, aggregate, evaluate, checkpoint.

Flower's ``Strategy.start`` runs all rounds in one call; this loop calls the same strategy
methods (``configure_train``, ``aggregate_train``, ``configure_evaluate``,
``aggregate_evaluate``) itself so that it can (1) screen every reply before the strategy sees
it, (2) write each completed round to disk and (3) resume after a crash with the right round
numbers, strategy state and normalisation.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from hymate.data.normalization import MomentSums, Normalizer
from hymate.model import HyMaTE
from hymate.model_bundle import ModelBundle
from hymate.weight_vector import WEIGHTS_KEY, from_vector, to_vector
from server.exchange import send_and_receive
from server.model_card import write_final_outputs
from server.run_dir import RoundCheckpoint, RunDirectory, restore_strategy_state, strategy_state
from server.screening import Rejection, screen_replies, silent_sites, site_of
from server.settings import ServerSettings
from strategies.registry import build_strategy

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """The federation cannot go on (too few sites, inconsistent schemas); names why."""


@dataclass
class FederationFacts:
    """What the coordinator learns before round 1 and keeps for the whole run (and resume)."""

    variables: list[str]
    static_names: list[str]
    dataset: str
    normalizer: dict[str, list[float] | float]
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)

    def build_normalizer(self) -> Normalizer:
        return Normalizer.from_arrays({k: np.asarray(v) for k, v in self.normalizer.items()})


def weights_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    """The global model as it travels: one flat vector (hymate.weight_vector says why)."""
    return ArrayRecord({WEIGHTS_KEY: Array(to_vector(weights))})


def weights_from(record: ArrayRecord, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return from_vector(record[WEIGHTS_KEY].numpy(), like)


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def wait_for_sites(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Node ids once at least ``minimum`` sites are connected; FederationError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of the required {minimum} sites connected within {timeout:.0f} s")
        time.sleep(1.0)
    return nodes


def weighted_means(replies: Iterable[Message]) -> dict[str, float]:
    """Example-weighted means of every metric, skipping sites where a metric is undefined (NaN)."""
    totals: dict[str, list[float]] = {}
    for message in replies:
        metrics = message.content["metrics"]
        n = float(metrics["num-examples"])
        for key, value in metrics.items():
            if key != "num-examples" and isinstance(value, (int, float)) and math.isfinite(value):
                acc = totals.setdefault(key, [0.0, 0.0])
                acc[0] += n * value
                acc[1] += n
    return {k: s / w for k, (s, w) in totals.items() if w > 0}


def per_site(replies: Iterable[Message]) -> dict[str, dict[str, float]]:
    return {
        site_of(m, f"node-{m.metadata.src_node_id}"): {
            k: v for k, v in m.content["metrics"].items() if isinstance(v, (int, float))
        }
        for m in replies
    }


def privacy_reports(replies: Iterable[Message]) -> dict[str, dict[str, float]]:
    """Each DP site's reported spend (trained or refused): aggregate numbers only."""
    reports = {}
    for m in replies:
        if m.has_error():
            continue
        for record in ("privacy", "refused"):
            if record in m.content.config_records:
                values = m.content[record]
                reports[site_of(m, f"node-{m.metadata.src_node_id}")] = {
                    k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
    return reports


class Federation:
    """One federated run of HyMaTE over the sites connected to ``grid``."""

    def __init__(self, grid: Grid, settings: ServerSettings):
        self.grid = grid
        self.settings = settings
        self.run_dir = RunDirectory(settings.run_dir)
        self.strategy: Strategy = build_strategy(settings.strategy, settings.min_clients)
        self.sites: dict[int, str] = {}

    def run(self) -> dict[str, Any]:
        s = self.settings
        self.run_dir.prepare(resume=s.resume)
        done = self.run_dir.completed_rounds() if s.resume else []
        wait_for_sites(self.grid, s.sites_to_wait_for, s.wait_for_clients)
        if done:
            facts = FederationFacts(**self.run_dir.read_federation()["facts"])
            checkpoint = self.run_dir.read_round(done[-1])
            weights = checkpoint.weights
            restore_strategy_state(self.strategy, checkpoint.strategy_state)
            log.info("resuming after round %d of %d", done[-1], s.rounds)
        else:
            facts = self.learn_facts()
            weights = self.initial_weights(facts)
            self.run_dir.write_federation({"facts": asdict(facts), "settings": s})
        plan = s.plan(facts.build_normalizer()).to_record()
        for server_round in range((done[-1] if done else 0) + 1, s.rounds + 1):
            weights = self.run_round(server_round, weights, plan)
        bundle = self.bundle(facts, weights)
        return write_final_outputs(self.run_dir, s, facts, bundle)

    def learn_facts(self) -> FederationFacts:
        """Ask every site for its schema and moment sums; combine them into the global normaliser."""
        nodes = list(self.grid.get_node_ids())
        messages = [
            Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=n)
            for n in nodes
        ]
        replies = send_and_receive(self.grid, messages, self.settings.round_timeout)
        good, schemas, provenance = [], {}, {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("normalisation query: node %d failed: %s", node, reply.error.reason)
                continue
            site = site_of(reply, f"node-{node}")
            self.sites[node] = site
            schema = reply.content["schema"]
            schemas[site] = (tuple(schema["variables"]), tuple(schema["static"]), str(schema["dataset"]))
            provenance[site] = {"dataset": str(schema["dataset"])} | dict(reply.content["metrics"])
            good.append(MomentSums.from_arrays(from_record(reply.content["moments"])))
        if len(good) < self.settings.min_clients:
            raise FederationError(
                f"only {len(good)} sites answered the normalisation query; {self.settings.min_clients} required"
            )
        if len(set(schemas.values())) > 1:
            detail = "; ".join(
                f"{site}: {len(v)} variables, {len(st)} static ({ds})" for site, (v, st, ds) in schemas.items()
            )
            raise FederationError(f"sites disagree on the data schema: {detail}")
        variables, static, dataset = next(iter(schemas.values()))
        normalizer = MomentSums.merge(*good).to_normalizer()
        arrays = {
            k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in normalizer.to_arrays().items()
        }
        log.info("global normalisation from %d sites: %s", len(good), ", ".join(sorted(provenance)))
        return FederationFacts(list(variables), list(static), dataset, arrays, provenance)

    def initial_weights(self, facts: FederationFacts) -> dict[str, np.ndarray]:
        torch.manual_seed(self.settings.seed)
        model = HyMaTE(self.settings.model.for_schema(len(facts.variables), len(facts.static_names)))
        return {k: v.numpy() for k, v in model.state_dict().items()}

    def run_round(
        self, server_round: int, weights: dict[str, np.ndarray], plan: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        s = self.settings
        start = time.monotonic()
        wait_for_sites(self.grid, s.sites_to_wait_for, s.wait_for_clients)
        global_arrays = weights_record(weights)

        messages = list(self.strategy.configure_train(server_round, global_arrays, ConfigRecord(plan), self.grid))
        replies_train = send_and_receive(self.grid, messages, s.round_timeout)
        trained, rejected = screen_replies(replies_train, "train", global_arrays, self.sites)
        rejected += silent_sites(messages, replies_train, "train", self.sites, s.round_timeout)
        self._require_enough(server_round, "train", trained, rejected)
        new_arrays, _ = self.strategy.aggregate_train(server_round, trained)
        if new_arrays is None:
            raise FederationError(f"round {server_round}: strategy {s.strategy.name} produced no model")
        new_weights = weights_from(new_arrays, weights)

        messages = list(self.strategy.configure_evaluate(server_round, new_arrays, ConfigRecord(plan), self.grid))
        replies = send_and_receive(self.grid, messages, s.round_timeout)
        evaluated, eval_rejected = screen_replies(replies, "evaluate", None, self.sites)
        eval_rejected += silent_sites(messages, replies, "evaluate", self.sites, s.round_timeout)
        if evaluated:
            self.strategy.aggregate_evaluate(server_round, evaluated)
        rejected += eval_rejected

        metrics = {
            "round": server_round,
            "train": weighted_means(trained),
            "evaluate": weighted_means(evaluated),
            "sites": {"train": per_site(trained), "evaluate": per_site(evaluated)},
            "privacy": privacy_reports(replies_train),
            "rejected": [asdict(r) for r in rejected],
            "seconds": time.monotonic() - start,
        }
        self.run_dir.write_round(RoundCheckpoint(server_round, new_weights, strategy_state(self.strategy), metrics))
        log.info(
            "round %d/%d: %d sites trained, %d rejected; evaluation %s",
            server_round,
            s.rounds,
            len(trained),
            len(rejected),
            metrics["evaluate"],
        )
        return new_weights

    def _require_enough(
        self, server_round: int, phase: str, accepted: list[Message], rejected: list[Rejection]
    ) -> None:
        if len(accepted) < self.settings.min_clients:
            reasons = "; ".join(f"{r.site}: {r.reason}" for r in rejected) or "no replies"
            raise FederationError(
                f"round {server_round} {phase}: only {len(accepted)} usable replies, {self.settings.min_clients} required ({reasons})"
            )

    def bundle(self, facts: FederationFacts, weights: dict[str, np.ndarray]) -> ModelBundle:
        config = self.settings.model.for_schema(len(facts.variables), len(facts.static_names))
        return ModelBundle(
            config=config,
            state_dict={k: torch.from_numpy(np.array(v)) for k, v in weights.items()},
            normalizer=facts.build_normalizer(),
            variables=tuple(facts.variables),
            static_names=tuple(facts.static_names),
        )
