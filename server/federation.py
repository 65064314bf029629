"""The coordinator's round loop: normalise, then train, screen, aggregate, evaluate, checkpoint.

Flower's ``Strategy.start`` runs all rounds in one call; this loop calls the same strategy
methods (``configure_train``, ``aggregate_train``, ``configure_evaluate``,
``aggregate_evaluate``) itself so that it can (1) screen every reply before the strategy sees
it, (2) write each completed round to disk and (3) resume after a crash with the right round
numbers, strategy state and normalisation. Sites are named by their keys (``site_identity``);
the strategy sees only the nodes admitted to the run; every round, reply, rejection and refusal
goes to the run's event stream (``events``) as it happens.

With secure aggregation (``server.secure_aggregation``) the normalisation sums and every
round's updates arrive only as sums: the strategy still picks the sites and turns the mean
update into the next model, but each of the replies it is handed carries that mean, never one
site's update, and no single update can be screened. A round whose exchange halts (too few
sites left to unmask) keeps the model as it was, is recorded as failed, and the next goes on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy

from hymate.data.normalization import MomentSums
from hymate.model import HyMaTE, remove_class_weight
from hymate.model_bundle import ModelBundle, initial_weights
from hymate.secure_sums import (
    PHASE_KEY,
    PHASE_NORMALISATION,
    PHASE_TRAIN,
    decode,
    encoded_length,
    split_training_payload,
)
from hymate.weight_vector import WEIGHTS_KEY, from_vector, to_vector
from server.events import EventLog
from server.exchange import send_and_receive
from server.federation_facts import FederationFacts
from server.model_card import metrics_table, model_card, render_markdown
from server.round_selection import average_weights, kept_round, with_averaged_rounds
from server.run_dir import RoundCheckpoint, RunDirectory, restore_strategy_state, strategy_state
from server.screening import DropoutReports, Rejection, Screened, screen_replies
from server.secure_aggregation import SecureAggregationFailed, SecureAggregator
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


def _query_answer(
    reply: SiteReply, with_moments: bool = True
) -> tuple[tuple[tuple[str, ...], tuple[str, ...], str], dict[str, Any], MomentSums | None]:
    """(schema, provenance, moment sums) of a screened normalisation reply; ValueError if malformed.

    ``with_moments=False`` (secure aggregation): the sums come masked, later; any sent here are ignored."""
    content = reply.message.content
    if with_moments and "moments" not in content.array_records:
        raise ValueError(
            "sent no normalisation sums in the clear: the site requires secure aggregation (run with "
            "--secure-aggregation)"
        )
    try:
        schema = content["schema"]
        key = (tuple(map(str, schema["variables"])), tuple(map(str, schema["static"])), str(schema["dataset"]))
        moments = MomentSums.from_arrays(from_record(content["moments"])) if with_moments else None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed normalisation reply ({type(e).__name__}: {e})") from None
    return key, {"dataset": key[2]} | dict(content["metrics"]), moments


@dataclass(frozen=True)
class TrainedReplies:
    """A training phase's outcome for the round record: the replies the strategy aggregated, the
    replies from verified sites (for privacy reports) and what each site's row shows."""

    accepted: list[SiteReply]
    verified: list[SiteReply]
    per_site: dict[str, dict[str, float]]


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
        self.secure = (
            SecureAggregator(self.grid, settings.secure_aggregation, settings.round_timeout, run_id)
            if settings.secure_aggregation.enabled
            else None
        )

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
        self.facts = facts
        plan = s.plan(facts.build_normalizer(), facts.positive_class_weight()).to_record()
        for server_round in range((done[-1] if done else 0) + 1, s.rounds + 1):
            round_plan = plan | {"learning_rate": s.learning_rate_at(server_round)}
            weights = self.run_round(server_round, weights, round_plan)
        return self.write_final_outputs(facts, weights, plan)

    def write_final_outputs(
        self, facts: FederationFacts, last_weights: dict[str, np.ndarray], plan: dict[str, Any]
    ) -> dict[str, Any]:
        """The kept round's model (``keep-round``), or the mean of the rounds up to it
        (``average-rounds``), then its card (which holds the model's SHA-256) and every round's
        metrics. ``plan`` is the rounds' plan, for the averaged model's evaluation."""
        history = self.run_dir.history()
        selection = self.settings.selection
        kept = with_averaged_rounds(history, kept_round(history, selection.keep_round), selection.average_rounds)
        weights = last_weights
        final_evaluation = None  # the kept round's own evaluation
        if kept.averaged_rounds:
            log.info("averaging the models of rounds %s", ", ".join(map(str, kept.averaged_rounds)))
            weights = average_weights([self.run_dir.read_round(r).weights for r in kept.averaged_rounds])
            final_evaluation = self.evaluate_averaged_model(weights, plan)
        elif kept.round != history[-1]["round"]:
            log.info("keeping round %d of %d (%s)", kept.round, history[-1]["round"], kept.rule)
            weights = self.run_dir.read_round(kept.round).weights
        model_file = self.run_dir.save_model(self.bundle(facts, weights))
        card = model_card(history, self.settings, facts, model_file, kept, self.run_id, final_evaluation)
        self.run_dir.write_model_card(card, render_markdown(card, model_file.name), metrics_table(history))
        return card

    def evaluate_averaged_model(self, weights: dict[str, np.ndarray], plan: dict[str, Any]) -> dict[str, Any]:
        """The sites' evaluation of the averaged model, which no round sent them, in a last
        message (as a round's evaluation: screened, its rejections on the card)."""
        s = self.settings
        self.wait_for_sites(s.sites_to_wait_for)
        evaluated, rejected = self._evaluate(s.rounds, weights, plan | {"learning_rate": s.learning_rate_at(s.rounds)})
        return {
            "evaluate": weighted_means(r.message for r in evaluated.accepted),
            "sites": {"evaluate": per_site(evaluated.accepted)},
            "rejected": [asdict(r) for r in rejected],
        }

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
        schemas, provenance, moments, nodes = {}, {}, [], {}
        for reply in list(screened.accepted):
            try:
                schemas[reply.site], provenance[reply.site], sums = _query_answer(reply, self.secure is None)
            except ValueError as e:
                screened.accepted.remove(reply)
                screened.rejected.append(Rejection(reply.node_id, reply.site, "query", str(e), "invalid"))
                continue
            moments.append(sums)
            nodes[reply.site] = reply.node_id
        rejected = self._report(0, "query", screened)
        self._require_enough_for_query(len(moments), rejected)
        if len(set(schemas.values())) > 1:
            detail = "; ".join(
                f"{site}: {len(v)} variables, {len(st)} static ({ds})" for site, (v, st, ds) in schemas.items()
            )
            raise FederationError(f"sites disagree on the data schema: {detail}")
        variables, static, dataset = next(iter(schemas.values()))
        if self.secure is None:
            total = MomentSums.merge(*moments)
        else:
            total, summed, secure_rejected = self._secure_moments(list(nodes.values()), len(variables), len(static))
            rejected += secure_rejected
            provenance = {site: provenance[site] for site in summed}
            self._require_enough_for_query(len(summed), rejected)
        normalizer = total.to_normalizer()
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

    def _require_enough_for_query(self, answered: int, rejected: list[Rejection]) -> None:
        if answered < self.settings.min_clients:
            reasons = "; ".join(f"{r.site}: {r.reason}" for r in rejected) or "no replies"
            raise FederationError(
                f"only {answered} sites answered the normalisation query; {self.settings.min_clients} required ({reasons})"
            )

    def _secure_moments(
        self, nodes: list[int], n_variables: int, n_static: int
    ) -> tuple[MomentSums, list[str], list[Rejection]]:
        """The sites' moment sums, summed under secure aggregation: (total, the sites in it, rejections)."""
        length = 3 * n_variables + 3 * n_static
        try:
            secure = self.secure.normalisation_mean(nodes, {PHASE_KEY: PHASE_NORMALISATION}, encoded_length(length))
        except SecureAggregationFailed as e:
            raise FederationError(f"the normalisation sums could not be securely aggregated: {e.reason}") from None
        rejected = self.dropouts.first_reports(Screened([], [], secure.rejected))
        for r in rejected:
            self._log_rejection(0, "query", r)
        totals = decode(secure.mean, len(secure.contributors))
        cuts = np.cumsum([n_variables] * 3 + [n_static] * 2)
        sites = [c.site for c in secure.contributors]
        log.info("normalisation sums of %d sites securely aggregated", len(sites))
        return MomentSums.from_arrays(np.split(totals, cuts)), sites, rejected

    def initial_weights(self, facts: FederationFacts) -> dict[str, np.ndarray]:
        """Random weights by the run's seed, or the ``--init-from`` checkpoint's once the sites'
        schema is known to be its vocabulary (a mismatch ends the run, naming both)."""
        s = self.settings
        torch.manual_seed(s.seed)
        model = HyMaTE(s.model.for_schema(len(facts.variables), len(facts.static_names)))
        if s.initialisation.init_from:
            try:
                state = initial_weights(
                    s.initialisation.init_from, s.model, tuple(facts.variables), tuple(facts.static_names)
                )
            except ValueError as e:
                raise FederationError(f"{e} (the sites answered with dataset {facts.dataset})") from None
            model.load_state_dict(state)
            self.events.emit("initialised", init_from=s.initialisation.init_from, freeze=s.freeze)
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
        train = self._train_securely if self.secure is not None else self._train
        try:
            new_arrays, trained, rejected = train(server_round, global_arrays, messages)
        except SecureAggregationFailed as e:
            return self._failed_round(server_round, weights, e, start)
        if new_arrays is None:
            raise FederationError(f"round {server_round}: strategy {s.strategy.name} produced no model")
        new_weights = weights_from(new_arrays, weights)

        evaluated, rejected_in_evaluation = self._evaluate(server_round, new_weights, plan)
        rejected += rejected_in_evaluation
        metrics = {
            "round": server_round,
            "train": weighted_means(r.message for r in trained.accepted),
            "evaluate": weighted_means(r.message for r in evaluated.accepted),
            "learning_rate": plan["learning_rate"],
            "sites": {"train": trained.per_site, "evaluate": per_site(evaluated.accepted)},
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

    def _evaluate(
        self, server_round: int, weights: dict[str, np.ndarray], plan: dict[str, Any]
    ) -> tuple[Screened, list[Rejection]]:
        """The sites' evaluation of ``weights``, as they will travel and be saved (weights_from's
        dtype), screened and reported."""
        arrays = weights_record(weights)
        messages = list(self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(plan), self.grid))
        replies = send_and_receive(self.grid, messages, self.settings.round_timeout)
        evaluated = screen_replies(messages, replies, "evaluate", None, self.identities, self.settings.round_timeout)
        rejected = self._report(server_round, "evaluate", evaluated)
        if evaluated.accepted:
            try:
                self.strategy.aggregate_evaluate(server_round, [r.message for r in evaluated.accepted])
            except InconsistentMessageReplies as e:  # sites report different metrics (say, an older client)
                log.warning(
                    "round %d: %s did not aggregate evaluation: %s", server_round, self.settings.strategy.name, e
                )
        return evaluated, rejected

    def _train(
        self, server_round: int, global_arrays: ArrayRecord, messages: list[Message]
    ) -> tuple[ArrayRecord | None, TrainedReplies, list[Rejection]]:
        """Plain training: every site's update is screened, then the strategy aggregates them."""
        replies = send_and_receive(self.grid, messages, self.settings.round_timeout)
        trained = screen_replies(
            messages, replies, "train", global_arrays, self.identities, self.settings.round_timeout
        )
        rejected = self._report(server_round, "train", trained)
        self._require_enough(server_round, "train", trained.accepted, rejected)
        new_arrays, _ = self.strategy.aggregate_train(server_round, [r.message for r in trained.accepted])
        return new_arrays, TrainedReplies(trained.accepted, trained.verified, per_site(trained.accepted)), rejected

    def _train_securely(
        self, server_round: int, global_arrays: ArrayRecord, messages: list[Message]
    ) -> tuple[ArrayRecord | None, TrainedReplies, list[Rejection]]:
        """Secure training: SecAgg+ reveals the mean update; the strategy is handed one reply per
        contributing site, each carrying the global model plus that mean and the site's example
        count, so its weighted mean is the mean (FedAvg) and its optimiser sees one pseudo-gradient."""
        global_vector = global_arrays[WEIGHTS_KEY].numpy()
        instructions = {
            m.metadata.dst_node_id: FitIns(
                ndarrays_to_parameters([m.content["arrays"][WEIGHTS_KEY].numpy()]),
                dict(m.content["config"]) | {PHASE_KEY: PHASE_TRAIN},
            )
            for m in messages
        }
        # The largest site's training stays bound the weights SecAgg+ quantises (its max_weight).
        largest = max((int(p.get("stays_train", 1)) for p in self.facts.sites.values()), default=1)
        secure = self.secure.training_mean(server_round, instructions, global_vector.size + 1, largest)
        verified = [SiteReply(c.node_id, c.site, c.reply) for c in secure.contributors]
        rejected = self.dropouts.first_reports(Screened([], verified, secure.rejected))
        for r in rejected:
            self._log_rejection(server_round, "train", r)
        self._require_enough(server_round, "train", secure.contributors, rejected)
        mean_update, mean_loss = split_training_payload(secure.mean)
        aggregate = (global_vector.astype(np.float64) + mean_update).astype(global_vector.dtype)
        by_node = {m.metadata.dst_node_id: m for m in messages}
        handed = []
        for c in secure.contributors:
            content = RecordDict(
                {
                    "arrays": ArrayRecord({WEIGHTS_KEY: Array(aggregate.copy())}),
                    "metrics": MetricRecord({"num-examples": c.num_examples, "train_loss": mean_loss}),
                }
            )
            handed.append(SiteReply(c.node_id, c.site, Message(content, reply_to=by_node[c.node_id])))
        for c in secure.contributors:
            self.events.emit(
                "reply", round=server_round, phase="train", site=c.site, metrics={"num-examples": c.num_examples}
            )
        new_arrays, _ = self.strategy.aggregate_train(server_round, [r.message for r in handed])
        per_site_examples = {c.site: {"num-examples": c.num_examples} for c in secure.contributors}
        return new_arrays, TrainedReplies(handed, verified, per_site_examples), rejected

    def _failed_round(
        self, server_round: int, weights: dict[str, np.ndarray], failure: SecureAggregationFailed, start: float
    ) -> dict[str, np.ndarray]:
        """A round whose secure exchange halted: the model stays, the round is recorded as failed."""
        rejected = self.dropouts.first_reports(Screened([], [], failure.rejected))
        for r in rejected:
            self._log_rejection(server_round, "train", r)
        log.error("round %d/%d failed: %s", server_round, self.settings.rounds, failure.reason)
        self.events.emit("round-failed", round=server_round, rounds=self.settings.rounds, reason=failure.reason)
        metrics = {
            "round": server_round,
            "failed": failure.reason,
            "train": {},
            "evaluate": {},
            "sites": {"train": {}, "evaluate": {}},
            "privacy": {},
            "rejected": [asdict(r) for r in rejected],
            "refused": [asdict(r) for r in self.identities.refusals.values()],
            "seconds": time.monotonic() - start,
        }
        self.run_dir.write_round(RoundCheckpoint(server_round, weights, strategy_state(self.strategy), metrics))
        return weights

    def _report(self, server_round: int, phase: str, screened: Screened) -> list[Rejection]:
        """Log and stream one phase's replies; the rejections to record (a dropout only once)."""
        for reply in screened.accepted:
            metrics = {k: v for k, v in reply.message.content["metrics"].items() if isinstance(v, (int, float))}
            self.events.emit("reply", round=server_round, phase=phase, site=reply.site, metrics=metrics)
        rejected = self.dropouts.first_reports(screened)
        for r in rejected:
            self._log_rejection(server_round, phase, r)
        return rejected

    def _log_rejection(self, server_round: int, phase: str, r: Rejection) -> None:
        log.warning(
            "round %d %s: rejected %s (node %d, %s): %s", server_round, phase, r.site, r.node_id, r.cause, r.reason
        )
        self.events.emit("rejected", round=server_round, phase=phase, site=r.site, cause=r.cause, reason=r.reason)

    def _refused(self, refusal: Refusal) -> None:
        self.events.emit("refused", site=refusal.site, node_id=refusal.node_id, reason=refusal.reason)

    def _require_enough(
        self, server_round: int, phase: str, accepted: Sequence[Any], rejected: list[Rejection]
    ) -> None:
        if len(accepted) < self.settings.min_clients:
            reasons = "; ".join(f"{r.site}: {r.reason}" for r in rejected) or "no replies"
            raise FederationError(
                f"round {server_round} {phase}: only {len(accepted)} usable replies, {self.settings.min_clients} required ({reasons})"
            )

    def bundle(self, facts: FederationFacts, weights: dict[str, np.ndarray]) -> ModelBundle:
        """The model file of ``weights``, its risks without the class weight's offset (the card says which)."""
        config = self.settings.model.for_schema(len(facts.variables), len(facts.static_names))
        state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
        trained_weight = self.settings.trained_class_weight(facts)
        if trained_weight is not None:
            remove_class_weight(state, trained_weight)
        return ModelBundle(
            config=config,
            state_dict=state,
            normalizer=facts.build_normalizer(),
            variables=tuple(facts.variables),
            static_names=tuple(facts.static_names),
        )
