"""Sites that run a real ClientApp in this process, for secure-aggregation tests of the coordinator.

Each ``AppSite`` is a node with its own Flower ``Context`` (SecAgg+ keeps its protocol state
there) and a ClientApp whose mods are the installed ones (``client.audit``,
``client.secure_aggregation``, so Flower's ``secaggplus_mod`` does the cryptography) around
stand-in handlers: training adds a fixed, site-specific update to the received weights, so a
test knows exactly what each site would have sent in the clear. Messages travel as copies, as
they do over the wire. A site can go silent from a given round and SecAgg+ stage on.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

from client.audit import make_audit_mod
from client.secure_aggregation import is_required, local_moments, make_secure_aggregation_mod
from client.site import LocalData, SiteSettings
from client.training import clipped_as_asked
from hymate.data import LoadSummary, split_stays
from hymate.data.stays import StayTable
from hymate.weight_vector import WEIGHTS_KEY
from tests.fake_grid import AnsweringGrid


def local_data(table: StayTable, site: str, name: str, state_dir: Path) -> LocalData:
    part = table.where_site(site)
    train, val, test = split_stays(part, seed=0).tables(part)
    return LocalData(
        SiteSettings(dataset="synthetic", state_dir=state_dir, name=name), train, val, test, LoadSummary("synthetic")
    )


@dataclass
class AppSite:
    node_id: int
    data: LocalData
    update_scale: float = 0.01
    node_config: dict = field(default_factory=dict)
    silent_at: set[tuple[int, str]] = field(default_factory=set)  # (round, SecAgg+ stage) it does not answer
    updates: dict[int, np.ndarray] = field(default_factory=dict)  # round -> the weights it trained
    received: dict[int, np.ndarray] = field(default_factory=dict)  # round -> the weights it was sent

    @property
    def name(self) -> str:
        return self.data.settings.display_name

    def update(self, size: int, server_round: int) -> np.ndarray:
        rng = np.random.default_rng(1000 * server_round + self.node_id)
        return (self.update_scale * rng.uniform(-1, 1, size)).astype(np.float32)

    def app(self) -> ClientApp:
        app = ClientApp(mods=[make_audit_mod(lambda _: self.data), make_secure_aggregation_mod(lambda _: self.data)])

        @app.query()
        def query(msg: Message, context: Context) -> Message:
            variables, static = self.data.schema
            content = RecordDict(
                {
                    "schema": ConfigRecord(
                        {"variables": list(variables), "static": list(static), "dataset": "synthetic"}
                    ),
                    "metrics": MetricRecord(
                        {"num-examples": len(self.data.train), "stays_train": len(self.data.train)}
                    ),
                    "site": ConfigRecord({"name": self.name}),
                }
            )
            if not is_required(context):
                moments = local_moments(self.data).to_arrays()
                content["moments"] = ArrayRecord({k: Array(v) for k, v in moments.items()})
            return Message(content, reply_to=msg)

        @app.train()
        def train(msg: Message, context: Context) -> Message:
            received = msg.content["arrays"][WEIGHTS_KEY].numpy()
            server_round = int(msg.content["config"]["server-round"])
            trained = clipped_as_asked(
                received + self.update(received.size, server_round), received, msg.content["config"]
            )
            self.updates[server_round], self.received[server_round] = trained, received
            content = RecordDict(
                {
                    "arrays": ArrayRecord({WEIGHTS_KEY: Array(trained)}),
                    "metrics": MetricRecord(
                        {"num-examples": len(self.data.train), "train_loss": 0.5 + self.node_id / 10}
                    ),
                    "site": ConfigRecord({"name": self.name}),
                }
            )
            return Message(content, reply_to=msg)

        @app.evaluate()
        def evaluate(msg: Message, context: Context) -> Message:
            metrics = {"num-examples": len(self.data.test), "auroc": 0.7, "auprc": 0.4, "loss": 0.6, "num-positives": 3}
            return Message(
                RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": self.name})}), reply_to=msg
            )

        return app


def _stage(message: Message) -> str | None:
    record = message.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if record is None else str(record.get(Key.STAGE))


@dataclass
class AppGrid(AnsweringGrid):
    """The coordinator's view of ``sites``: every message is answered at once by a copy of it
    run through the site's ClientApp (an exception becomes an error reply, as at a real site)."""

    sites: list[AppSite]
    run_config: dict = field(default_factory=dict)
    sent: list[Message] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=itertools.count)
    _replies: dict[str, Message] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.apps = {s.node_id: s.app() for s in self.sites}
        self.contexts = {
            s.node_id: Context(7, s.node_id, dict(s.node_config), RecordDict(), dict(self.run_config))
            for s in self.sites
        }

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=s.node_id, name=s.name, last_activated_at="2026-01-01T00:00:00") for s in self.sites]

    def get_node_ids(self) -> list[int]:
        return [s.node_id for s in self.sites]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        by_id = {s.node_id: s for s in self.sites}
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            ids.append(message.metadata.message_id)
            self.sent.append(message)
            site = by_id[message.metadata.dst_node_id]
            if (int(message.metadata.group_id or 0), _stage(message)) in site.silent_at:
                continue
            delivered = copy.deepcopy(message)
            try:
                reply = self.apps[site.node_id](delivered, self.contexts[site.node_id])
            except Exception as e:  # what the site's runner sends back
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(e).__name__}: {e}"),
                    reply_to=delivered,
                )
            self._replies[message.metadata.message_id] = reply
        return ids
