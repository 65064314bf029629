"""Secure aggregation at the coordinator: Flower's SecAgg+ workflow, one exchange at a time.

Flower 1.42 has SecAgg+ only on its legacy path: ``SecAggPlusWorkflow`` runs four stages
(public keys, encrypted key shares, masked vectors, unmasking shares) against a
``LegacyContext`` whose legacy strategy chooses the sites (``configure_fit``) and receives the
unmasked result (``aggregate_fit``). Nothing of it needs changing to carry this product:

- the run's own (Message API) strategy still chooses the sites and their instructions; a small
  legacy strategy (``_Exchange``) hands those to the workflow and keeps what it receives, which
  is the example-weighted mean of the sites' payloads and each site's number of examples;
- every stage goes through ``_ScreenedGrid``: the run's admitted nodes only, replies collected
  without Flower's 3-second naps (``server.exchange``), and a reply from a node that is not the
  site it claims to be, or a masked vector of the wrong shape, dropped before the workflow sees
  it, so that site counts as having dropped out;
- what a payload holds (the model update and training loss, or exactly encoded normalisation
  sums) is ``hymate.secure_sums``'s business, shared with the sites.

A site that drops after the key exchange is unmasked from its neighbours' shares while at
least the threshold remain; below it the workflow halts and ``SecureAggregationFailed`` says at
which stage, how many sites were left and why the others went.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from hymate.secure_sums import GRID_CLIPPING_RANGE, GRID_QUANTIZATION_RANGE
from hymate.settings_fields import RunConfigError, setting
from server.exchange import send_and_receive
from server.screening import Rejection, error_reason
from server.site_identity import AdmittedGrid, SiteIdentities

log = logging.getLogger(__name__)

STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
#: Flower's mask range (2**32); a sum of quantised values over all sites must stay below it.
MODULUS_RANGE = 2**32


@dataclass(frozen=True)
class SecureAggregationSettings:
    """``--secure-aggregation`` and the SecAgg+ parameters (run-config keys ``secagg-*``)."""

    enabled: bool = setting(
        False,
        key="secure-aggregation",
        help="Flower's SecAgg+: the coordinator learns only sums of the sites' updates and normalisation statistics",
    )
    num_shares: float = setting(
        1.0,
        key="secagg-num-shares",
        help="key shares per site: a fraction (<= 1) of the round's sites, or a count (an integer >= 3)",
    )
    reconstruction_threshold: float = setting(
        0.75,
        key="secagg-reconstruction-threshold",
        help="fraction of a site's shares needed to unmask it after a dropout; above 0.5, so no coordinator "
        "can collect both kinds of shares of one site",
    )
    clipping_range: float = setting(
        4.0,
        key="secagg-clipping-range",
        help="bound on every element of a site's model update (a site refuses beyond it)",
    )
    quantization_range: int = setting(
        2**22, key="secagg-quantization-range", help="integer levels each element is quantised to"
    )

    def __post_init__(self) -> None:
        if self.num_shares <= 0 or (
            self.num_shares > 1 and (self.num_shares < 3 or self.num_shares != int(self.num_shares))
        ):
            raise RunConfigError(
                f"secagg-num-shares must be a fraction in (0, 1] or an integer >= 3, got {self.num_shares}"
            )
        if not 0.5 < self.reconstruction_threshold <= 1:
            raise RunConfigError(
                f"secagg-reconstruction-threshold must be in (0.5, 1], got {self.reconstruction_threshold}"
            )
        if not self.clipping_range > 0:
            raise RunConfigError(f"secagg-clipping-range must be positive, got {self.clipping_range}")
        if not 2**8 <= self.quantization_range <= 2**26:
            raise RunConfigError(f"secagg-quantization-range must be in [2**8, 2**26], got {self.quantization_range}")

    def shares(self) -> int | float:
        """As Flower's workflow takes it: a float is a fraction of the sites, an int a count."""
        return int(self.num_shares) if self.num_shares > 1 else float(self.num_shares)

    def as_record(self) -> dict[str, float | int]:
        """What the model card records."""
        return {
            "num_shares": self.shares(),
            "reconstruction_threshold": self.reconstruction_threshold,
            "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range,
        }


def error_bound(settings: SecureAggregationSettings, examples: Mapping[str, int]) -> float:
    """Largest error, per element, of the securely aggregated mean update against plain FedAvg's.

    Site i masks ``q_i/Q * x_i`` quantised by stochastic rounding (error below one level,
    ``2R/Q``), where ``q_i = round(Q * n_i / M)`` (``M``: the largest site's examples); the
    coordinator divides the sum by ``sum(q_i)/Q``. With ``N`` sites and ``n = sum(n_i)``, the
    rounding errors add up to less than ``N * 2R/Q * M/n`` and the rounded weights move the
    mean by at most ``N * R * M / (Q * n)``: together ``3 N R M / (Q n)``.
    """
    n, largest = sum(examples.values()), max(examples.values())
    return 3 * len(examples) * settings.clipping_range * largest / (settings.quantization_range * n)


class SecureAggregationFailed(RuntimeError):
    """The exchange halted (too few sites left, or Flower's workflow failed); the message says why."""

    def __init__(self, reason: str, rejected: list[Rejection]):
        super().__init__(reason)
        self.reason = reason
        self.rejected = rejected


@dataclass(frozen=True)
class Contribution:
    """A site whose masked vector is in the sum, its number of examples, and its reply (which
    carries only the masked vector and the clear records ``client.secure_aggregation`` allows)."""

    node_id: int
    site: str
    num_examples: int
    reply: Message


@dataclass
class SecureMean:
    """What one exchange reveals: the weighted mean of the contributors' payloads, and who they were."""

    mean: np.ndarray
    contributors: list[Contribution]
    rejected: list[Rejection] = field(default_factory=list)


class _Exchange(LegacyStrategy):
    """The legacy strategy the workflow asks: whom to send what (decided beforehand by the run's
    strategy), and where the unmasked result goes. It aggregates nothing itself."""

    def __init__(self, grid: Grid, run_id: int, instructions: Mapping[int, FitIns]):
        self.grid, self.run_id, self.instructions = grid, run_id, dict(instructions)
        self.results: list | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(nid, self.grid, self.run_id), ins) for nid, ins in self.instructions.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = results
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _ScreenedGrid(AdmittedGrid):
    """The admitted grid, collecting each stage's replies quickly and dropping unusable ones."""

    def __init__(self, grid: AdmittedGrid, timeout: float, payload_length: int, phase: str):
        super().__init__(grid.inner, grid.identities)
        self.timeout, self.payload_length, self.phase = timeout, payload_length, phase
        self.rejected: list[Rejection] = []
        self.collected: dict[int, Message] = {}  # the masked-vector replies, by node
        self.stage_count = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        stage = STAGES[min(self.stage_count, len(STAGES) - 1)]
        self.stage_count += 1
        replies = send_and_receive(self.inner, messages, self.timeout)
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        kept, answered = [], set()
        for reply in replies:
            node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            site = self.identities.name_of(node)
            if reply.has_error():
                cause, reason = error_reason(reply.error)
                self.rejected.append(Rejection(node, site, self.phase, f"{reason} (secure {stage} stage)", cause))
                kept.append(reply)
                continue
            problem = self.identities.check(node, reply) or self._shape_problem(stage, reply)
            if problem is not None:
                cause = "invalid" if problem.startswith("masked vector") else "identity"
                self.rejected.append(Rejection(node, self.identities.name_of(node), self.phase, problem, cause))
                continue
            if stage == "collect_masked_vectors":
                self.collected[node] = reply
            kept.append(reply)
        for node in sorted(set(destination.values()) - answered):
            reason = f"no reply within {self.timeout:.0f} s (secure {stage} stage)"
            self.rejected.append(Rejection(node, self.identities.name_of(node), self.phase, reason, "silent"))
        return kept

    def _shape_problem(self, stage: str, reply: Message) -> str | None:
        if stage != "collect_masked_vectors":
            return None
        try:
            chunks = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
            shapes = [bytes_to_ndarray(b).shape for b in chunks]
        except (KeyError, TypeError, ValueError) as e:
            return f"masked vector unreadable ({type(e).__name__})"
        if shapes != [(1,), (self.payload_length,)]:
            return f"masked vector of shapes {shapes}, expected {[(1,), (self.payload_length,)]}"
        return None


class SecureAggregator:
    """Runs SecAgg+ exchanges over the run's admitted sites."""

    def __init__(self, grid: AdmittedGrid, settings: SecureAggregationSettings, stage_timeout: float, run_id: int = 0):
        self.grid, self.settings, self.stage_timeout, self.run_id = grid, settings, stage_timeout, run_id

    @property
    def identities(self) -> SiteIdentities:
        return self.grid.identities

    def training_mean(
        self, server_round: int, instructions: Mapping[int, FitIns], payload_length: int, max_examples: int
    ) -> SecureMean:
        """The example-weighted mean of the sites' training payloads (update and loss)."""
        workflow = SecAggPlusWorkflow(
            self.settings.shares(),
            self.settings.reconstruction_threshold,
            max_weight=float(max(max_examples, 1)),
            clipping_range=self.settings.clipping_range,
            quantization_range=self.settings.quantization_range,
            modulus_range=MODULUS_RANGE,
            timeout=self.stage_timeout,
        )
        return self._exchange(workflow, server_round, instructions, payload_length, "train")

    def normalisation_mean(self, nodes: Iterable[int], config: dict, payload_length: int) -> SecureMean:
        """The plain mean (every site weighs 1) of the sites' exactly encoded moment sums."""
        workflow = SecAggPlusWorkflow(
            self.settings.shares(),
            self.settings.reconstruction_threshold,
            max_weight=1.0,
            clipping_range=GRID_CLIPPING_RANGE,
            quantization_range=GRID_QUANTIZATION_RANGE,
            modulus_range=MODULUS_RANGE,
            timeout=self.stage_timeout,
        )
        instructions = {n: FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"), dict(config)) for n in nodes}
        return self._exchange(workflow, 0, instructions, payload_length, "query")

    def _exchange(
        self,
        workflow: SecAggPlusWorkflow,
        server_round: int,
        instructions: Mapping[int, FitIns],
        length: int,
        phase: str,
    ) -> SecureMean:
        grid = _ScreenedGrid(self.grid, self.stage_timeout, length, phase)
        exchange = _Exchange(grid, self.run_id, instructions)
        state = RecordDict(
            {
                MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                MAIN_PARAMS_RECORD: ArrayRecord(),
            }
        )
        context = LegacyContext(Context(self.run_id, 0, {}, state, {}), strategy=exchange)
        progress = WorkflowState()
        for name, stage in zip(
            STAGES,
            (
                workflow.setup_stage,
                workflow.share_keys_stage,
                workflow.collect_masked_vectors_stage,
                workflow.unmask_stage,
            ),
            strict=True,
        ):
            try:
                carried_on = stage(grid, context, progress)
            except Exception as e:  # Flower's workflow met a reply it could not use
                log.exception("secure aggregation failed in the %s stage", name)
                raise SecureAggregationFailed(
                    f"secure aggregation failed in the {name} stage ({type(e).__name__}: {e})", grid.rejected
                ) from None
            if not carried_on:
                raise SecureAggregationFailed(self._halt_reason(name, progress, grid.rejected), grid.rejected)
        if not exchange.results:
            raise SecureAggregationFailed("secure aggregation produced no result", grid.rejected)
        (mean,) = parameters_to_ndarrays(exchange.results[0][1].parameters)
        contributors = [
            Contribution(
                proxy.node_id,
                self.identities.name_of(proxy.node_id),
                int(res.num_examples),
                grid.collected[proxy.node_id],
            )
            for proxy, res in exchange.results
        ]
        return SecureMean(np.asarray(mean, dtype=np.float64), contributors, grid.rejected)

    def _halt_reason(self, stage: str, progress: WorkflowState, rejected: list[Rejection]) -> str:
        sampled, active = len(progress.sampled_node_ids), len(progress.active_node_ids)
        gone = "; ".join(f"{r.site}: {r.reason}" for r in rejected) or "none rejected"
        if sampled < 2:
            return f"secure aggregation needs at least 2 sites, {sampled} were sampled"
        return (
            f"secure aggregation halted after the {stage} stage: {active} of {sampled} sites left, "
            f"{progress.threshold} needed to unmask ({gone})"
        )
