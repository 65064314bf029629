"""The coordinator's round loop: normalise, then train, screen, aggregate, evaluate, checkpoint.

Flower's ``Strategy.start`` runs all rounds in one call; this loop calls the same strategy
methods (``configure_train``, ``aggregate_train``, ``configure_evaluate``,
``aggregate_evaluate``) itself so that it can (1) screen every reply before the strategy sees
it, (2) write each completed round to disk and (3) resume after a crash with the right round
numbers, strategy state and normalisation. Sites are named by their keys (``site_identity``);
the strategy sees only the nodes admitted to the run; every round, reply, rejection and refusal
goes to the run's event stream (``events``) as it happens.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy

from hymate.data.normalization import MomentSums
from hymate.model import HyMaTE
from hymate.model_bundle import ModelBundle
from hymate.weight_vector import WEIGHTS_KEY, from_vector, to_vector
from server.events import EventLog
from server.exchange import send_and_receive
from server.federation_facts import FederationFacts
from server.model_card import metrics_table, model_card, render_markdown
from server.run_dir import RoundCheckpoint, RunDirectory, restore_strategy_state, strategy_state
from server.screening import DropoutReports, Rejection, Screened, screen_replies
from server.settings import ServerSettings
from server.site_identity import AdmittedGrid, Refusal, SiteIdentities, SiteReply
from strategies.registry import build_strategy

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """The federation cannot go on (too few sites, inconsistent schemas); names why."""


def weights_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    """The global model as it travels: one flat vector (hymate.weight_vector says why)."""
    return ArrayRecord({WEIGHTS_KEY: Array(to_vector(weights))})


def weights_from(record: ArrayRecord, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The strategy's aggregate as the model's tensors, in the model's dtype.

    Flower's adaptive server optimisers (FedAdam, FedYogi, FedAdagrad) compute the new global
    weights in float64 from float32 updates; without the cast their first aggregate fails the
    layout check and the federation stops. Only the coordinator's own aggregate is cast here: a
    site's reply of the wrong dtype stays an error (``screen_replies``).
    """
    vector = record[WEIGHTS_KEY].numpy()
    dtype = np.asarray(next(iter(like.values()))).dtype if like else vector.dtype
    if np.issubdtype(vector.dtype, np.floating) and np.issubdtype(dtype, np.floating):
        vector = vector.astype(dtype, copy=False)
    return from_vector(vector, like)


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


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


def per_site(replies: Iterable[SiteReply]) -> dict[str, dict[str, float]]:
    return {
        r.site: {k: v for k, v in r.message.content["metrics"].items() if isinstance(v, (int, float))} for r in replies
    }


def privacy_reports(replies: Iterable[SiteReply]) -> dict[str, dict[str, float]]:
    """Each DP site's reported spend (trained or refused): aggregate numbers only."""
    reports = {}
    for r in replies:
        if r.message.has_error():
            continue
        for record in ("privacy", "refused"):
            if record in r.message.content.config_records:
                values = r.message.content[record]
                reports[r.site] = {
                    k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
    return reports


def _query_answer(reply: SiteReply) -> tuple[tuple[tuple[str, ...], tuple[str, ...], str], dict[str, Any], MomentSums]:
    """(schema, provenance, moment sums) of a screened normalisation reply; ValueError if malformed."""
    content = reply.message.content
    try:
        schema = content["schema"]
        key = (tuple(map(str, schema["variables"])), tuple(map(str, schema["static"])), str(schema["dataset"]))
        moments = MomentSums.from_arrays(from_record(content["moments"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed normalisation reply ({type(e).__name__}: {e})") from None
    return key, {"dataset": key[2]} | dict(content["metrics"]), moments


class Federation:
    """One federated run of HyMaTE over the sites connected to ``grid``."""

    def __init__(self, grid: Grid, settings: ServerSettings, run_id: int = 0):
        self.settings = settings
        self.run_id = run_id
        self.run_dir = RunDirectory(settings.run_dir)
        self.events = EventLog(self.run_dir.events_file)
        self.identities = SiteIdentities(on_refusal=self._refused)
        self.grid = AdmittedGrid(grid, self.identities)  # what the strategy sees
        self.strategy: Strategy = build_strategy(settings.strategy, settings.min_clients)
        self.dropouts = DropoutReports()

    def run(self) -> dict[str, Any]:
        s = self.settings
        self.run_dir.prepare(resume=s.resume)
        done = self.run_dir.completed_rounds() if s.resume else []
        self.events.emit(
            "run-started",
            run_id=self.run_id,
            rounds=s.rounds,
            strategy=s.strategy.name,
            resumed_after=done[-1] if done else 0,
        )
        try:
            card = self._run(done)
        except FederationError as e:
            self.events.emit("run-failed", reason=str(e))
            raise
        self.events.emit(
            "run-finished",
            rounds_completed=card["training"]["rounds_completed"],
            model_card=self.run_dir.model_card_markdown_file,
        )
        return card

    def _run(self, done: list[int]) -> dict[str, Any]:
        s = self.settings
        if done:
            facts = self.run_dir.read_facts()
            self.identities.fix_members(facts.sites)  # the normaliser's sites, bound to keys as they connect
            self.wait_for_sites(s.sites_to_wait_for)
            checkpoint = self.run_dir.read_round(done[-1])
            weights = checkpoint.weights
            restore_strategy_state(self.strategy, checkpoint.strategy_state)
            log.info("resuming after round %d of %d", done[-1], s.rounds)
        else:
            self.wait_for_sites(s.sites_to_wait_for, s.sites_for_the_query)
            facts = self.learn_facts()
            weights = self.initial_weights(facts)
            self.run_dir.write_federation(facts, s)
        plan = s.plan(facts.build_normalizer()).to_record()
        for server_round in range((done[-1] if done else 0) + 1, s.rounds + 1):
            weights = self.run_round(server_round, weights, plan)
        return self.write_final_outputs(facts, self.bundle(facts, weights))

    def write_final_outputs(self, facts: FederationFacts, bundle: ModelBundle) -> dict[str, Any]:
        """The model, then its card (which holds the model's SHA-256) and every round's metrics."""
        history = self.run_dir.history()
        model_file = self.run_dir.save_model(bundle)
        card = model_card(history, self.settings, facts, model_file, self.run_id)
        self.run_dir.write_model_card(card, render_markdown(card, model_file.name), metrics_table(history))
        return card

    def wait_for_sites(self, minimum: int, names: Sequence[str] = ()) -> list[int]:
        """Admitted node ids once at least ``minimum`` sites, and every site in ``names``, are
        connected; FederationError after ``wait_for_clients`` seconds."""
        required = max(minimum, len(names))
        deadline = time.monotonic() + self.settings.wait_for_clients
        shown = None
        while True:
            nodes = self.grid.get_node_ids()
            missing = sorted(set(names) - {self.identities.name_of(n) for n in nodes})
            if len(nodes) >= minimum and not missing:
                return nodes
            if shown != (len(nodes), missing):
                shown = (len(nodes), missing)
                self.events.emit("waiting", connected=len(nodes), required=required, missing=missing)
            if time.monotonic() > deadline:
                detail = (
                    f"; missing {', '.join(missing)} (the normalisation query waits for every registered site; "
                    "pass --min-connected to start with fewer)"
                    if missing
                    else ""
                )
                raise FederationError(
                    f"only {len(nodes)} of the required {required} sites connected within "
                    f"{self.settings.wait_for_clients:.0f} s{detail}"
                )
            time.sleep(1.0)

    def learn_facts(self) -> FederationFacts:
        """Ask every site for its schema and moment sums; combine them into the global normaliser.

        The sites whose moments went in become the run's members; every other node is refused."""
        nodes = list(self.grid.get_node_ids())
        messages = [
            Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=n)
            for n in nodes
        ]
        replies = send_and_receive(self.grid, messages, self.settings.round_timeout)
        screened = screen_replies(messages, replies, "query", None, self.identities, self.settings.round_timeout)
        schemas, provenance, moments = {}, {}, []
        for reply in list(screened.accepted):
            try:
                schemas[reply.site], provenance[reply.site], sums = _query_answer(reply)
            except ValueError as e:
                screened.accepted.remove(reply)
                screened.rejected.append(Rejection(reply.node_id, reply.site, "query", str(e), "invalid"))
                continue
            moments.append(sums)
        rejected = self._report(0, "query", screened)
        if len(moments) < self.settings.min_clients:
            reasons = "; ".join(f"{r.site}: {r.reason}" for r in rejected) or "no replies"
            raise FederationError(
                f"only {len(moments)} sites answered the normalisation query; {self.settings.min_clients} required ({reasons})"
            )
        if len(set(schemas.values())) > 1:
            detail = "; ".join(
                f"{site}: {len(v)} variables, {len(st)} static ({ds})" for site, (v, st, ds) in schemas.items()
            )
            raise FederationError(f"sites disagree on the data schema: {detail}")
        variables, static, dataset = next(iter(schemas.values()))
        normalizer = MomentSums.merge(*moments).to_normalizer()
        arrays = {
            k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in normalizer.to_arrays().items()
        }
        self.identities.fix_members(provenance)
        log.info("global normalisation from %d sites: %s", len(moments), ", ".join(sorted(provenance)))
        self.events.emit("normalisation", sites=sorted(provenance))
        kinds = self.identities.identity_kinds()
        return FederationFacts(
            list(variables),
            list(static),
            dataset,
            arrays,
            provenance,
            identities={site: kinds[site] for site in sorted(provenance)},
            query_rejections=[asdict(r) for r in rejected],
        )

    def initial_weights(self, facts: FederationFacts) -> dict[str, np.ndarray]:
        torch.manual_seed(self.settings.seed)
        model = HyMaTE(self.settings.model.for_schema(len(facts.variables), len(facts.static_names)))
        return {k: v.numpy() for k, v in model.state_dict().items()}

    def run_round(
        self, server_round: int, weights: dict[str, np.ndarray], plan: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        s = self.settings
        start = time.monotonic()
        self.wait_for_sites(s.sites_to_wait_for)
        self.events.emit("round-started", round=server_round, rounds=s.rounds)
        global_arrays = weights_record(weights)

        messages = list(self.strategy.configure_train(server_round, global_arrays, ConfigRecord(plan), self.grid))
        replies = send_and_receive(self.grid, messages, s.round_timeout)
        trained = screen_replies(messages, replies, "train", global_arrays, self.identities, s.round_timeout)
        rejected = self._report(server_round, "train", trained)
        self._require_enough(server_round, "train", trained.accepted, rejected)
        new_arrays, _ = self.strategy.aggregate_train(server_round, [r.message for r in trained.accepted])
        if new_arrays is None:
            raise FederationError(f"round {server_round}: strategy {s.strategy.name} produced no model")
        new_weights = weights_from(new_arrays, weights)

        # The sites evaluate the model as it will travel and be saved (weights_from's dtype).
        new_arrays = weights_record(new_weights)
        messages = list(self.strategy.configure_evaluate(server_round, new_arrays, ConfigRecord(plan), self.grid))
        replies = send_and_receive(self.grid, messages, s.round_timeout)
        evaluated = screen_replies(messages, replies, "evaluate", None, self.identities, s.round_timeout)
        rejected += self._report(server_round, "evaluate", evaluated)
        if evaluated.accepted:
            try:
                self.strategy.aggregate_evaluate(server_round, [r.message for r in evaluated.accepted])
            except InconsistentMessageReplies as e:  # sites report different metrics (say, an older client)
                log.warning("round %d: %s did not aggregate evaluation: %s", server_round, s.strategy.name, e)

        metrics = {
            "round": server_round,
            "train": weighted_means(r.message for r in trained.accepted),
            "evaluate": weighted_means(r.message for r in evaluated.accepted),
            "sites": {"train": per_site(trained.accepted), "evaluate": per_site(evaluated.accepted)},
            "privacy": privacy_reports(trained.verified),
            "rejected": [asdict(r) for r in rejected],
            "refused": [asdict(r) for r in self.identities.refusals.values()],
            "seconds": time.monotonic() - start,
        }
        self.run_dir.write_round(RoundCheckpoint(server_round, new_weights, strategy_state(self.strategy), metrics))
        self.events.emit(
            "round-finished",
            round=server_round,
            rounds=s.rounds,
            trained=sorted(metrics["sites"]["train"]),
            evaluate=metrics["evaluate"],
            seconds=metrics["seconds"],
        )
        log.info(
            "round %d/%d: %d sites trained, %d rejected; evaluation %s",
            server_round,
            s.rounds,
            len(trained.accepted),
            len(rejected),
            metrics["evaluate"],
        )
        return new_weights

    def _report(self, server_round: int, phase: str, screened: Screened) -> list[Rejection]:
        """Log and stream one phase's replies; the rejections to record (a dropout only once)."""
        for reply in screened.accepted:
            metrics = {k: v for k, v in reply.message.content["metrics"].items() if isinstance(v, (int, float))}
            self.events.emit("reply", round=server_round, phase=phase, site=reply.site, metrics=metrics)
        rejected = self.dropouts.first_reports(screened)
        for r in rejected:
            log.warning(
                "round %d %s: rejected %s (node %d, %s): %s", server_round, phase, r.site, r.node_id, r.cause, r.reason
            )
            self.events.emit("rejected", round=server_round, phase=phase, site=r.site, cause=r.cause, reason=r.reason)
        return rejected

    def _refused(self, refusal: Refusal) -> None:
        self.events.emit("refused", site=refusal.site, node_id=refusal.node_id, reason=refusal.reason)

    def _require_enough(
        self, server_round: int, phase: str, accepted: list[SiteReply], rejected: list[Rejection]
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
