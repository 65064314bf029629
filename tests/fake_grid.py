"""An in-process stand-in for Flower's grid and the sites behind it, for coordinator tests.

Each ``FakeSite`` is a node: the name its key is registered under (empty: an unauthenticated
run), the name it reports, and how it behaves (joins late, has gone away, says nothing). Its
replies are real ``flwr.app.Message`` objects shaped like the ClientApp's, so the
coordinator's round loop runs unchanged against it in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

VARIABLES = ["HR", "SBP"]
STATIC = ["Age"]


@contextlib.contextmanager
def serverapp_identity(run_id: int = 7) -> Iterator[None]:
    """What Flower sets in a ServerApp's process before ``Message(...)`` can be built."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@dataclass
class FakeSite:
    node_id: int
    registered: str = ""  # the name its key is registered under; "" in an unauthenticated run
    claims: str = ""  # the name its replies report (default: the registered one)
    joins_after_query: bool = False  # connects only once the normalisation query has been answered
    gone_from_round: int | None = None  # from this round on, Flower answers for it: node unavailable
    silent_from_round: int | None = None  # from this round on, it never answers
    examples: int = 50
    positives: int | None = 10
    activated_at: str = "2026-01-01T00:00:00"
    step: float = 0.0  # added to every weight it trains, so that rounds' models differ
    positives_train: int | None = None  # reported with the normalisation query when set
    val_auroc: dict[int, float] = field(default_factory=dict)  # per round; none: no validation metrics
    val_loss: dict[int, float] = field(default_factory=dict)  # per round, reported beside val_auroc

    @property
    def name(self) -> str:
        return self.claims or self.registered

    def reply(self, message: Message, server_round: int) -> Message | None:
        if self.silent_from_round is not None and server_round >= self.silent_from_round:
            return None
        if self.gone_from_round is not None and server_round >= self.gone_from_round:
            return offline_reply(message)
        site = ConfigRecord({"name": self.name})
        kind = message.metadata.message_type
        if kind == "query":
            moments = {
                "value_count": np.full(2, 10.0 * self.examples),
                "value_sum": np.full(2, 70.0 * self.examples),
                "value_sumsq": np.full(2, 5000.0 * self.examples),
                "static_count": np.full(1, float(self.examples)),
                "static_sum": np.full(1, 60.0 * self.examples),
                "static_sumsq": np.full(1, 3700.0 * self.examples),
            }
            content = RecordDict(
                {
                    "moments": ArrayRecord({k: Array(v) for k, v in moments.items()}),
                    "schema": ConfigRecord({"variables": VARIABLES, "static": STATIC, "dataset": "synthetic"}),
                    "metrics": MetricRecord(
                        {"num-examples": self.examples, "stays_train": self.examples, "stays_test": 20}
                        | ({} if self.positives_train is None else {"positives_train": self.positives_train})
                    ),
                    "site": site,
                }
            )
        elif kind.startswith("train"):
            arrays = ArrayRecord(
                {
                    k: Array(np.ascontiguousarray(a.numpy() + np.asarray(self.step, a.numpy().dtype)))
                    for k, a in message.content["arrays"].items()
                }
            )
            metrics = MetricRecord(
                {"num-examples": self.examples, "train_loss": 0.5 + self.node_id / 100, "seconds": 1.0}
            )
            content = RecordDict({"arrays": arrays, "metrics": metrics, "site": site})
        else:
            metrics = {"num-examples": 40, "auroc": 0.8, "auprc": 0.5, "loss": 0.4}
            if self.positives is not None:
                metrics["num-positives"] = self.positives
            if server_round in self.val_auroc:
                metrics |= {"val-auroc": self.val_auroc[server_round], "val-auprc": 0.3, "val-num-examples": 20}
            if server_round in self.val_loss:
                metrics |= {"val-loss": self.val_loss[server_round], "val-num-examples": 20}
            content = RecordDict({"metrics": MetricRecord(metrics), "site": site})
        return Message(content, reply_to=message)


def offline_reply(message: Message) -> Message:
    """What the SuperLink itself answers for a node whose heartbeats stopped (from node 1)."""
    metadata = Metadata(
        run_id=message.metadata.run_id,
        message_id="",
        src_node_id=SUPERLINK_NODE_ID,
        dst_node_id=SUPERLINK_NODE_ID,
        reply_to_message_id=message.metadata.message_id,
        group_id=message.metadata.group_id,
        created_at=0.0,
        ttl=60.0,
        message_type=message.metadata.message_type,
    )
    return Message(metadata=metadata, error=Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"))


class AnsweringGrid(Grid):
    """A Grid whose ``push_messages`` puts each reply in ``self._replies`` at once: what the
    test grids share. The rest of Flower's Grid interface is unused by the coordinator's loop."""

    _replies: dict[str, Message]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    # Unused by the coordinator's loop, required by the interface.
    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError


@dataclass
class FakeGrid(AnsweringGrid):
    sites: list[FakeSite]
    queried: bool = False
    server_round: int = 0
    sent: list[Message] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=itertools.count)
    _replies: dict[str, Message] = field(default_factory=dict)

    def connected(self) -> list[FakeSite]:
        return [s for s in self.sites if self.queried or not s.joins_after_query]

    def get_nodes(self) -> list[NodeInfo]:
        return [
            NodeInfo(node_id=s.node_id, name=s.registered, last_activated_at=s.activated_at)
            for s in self.connected()
            if s.gone_from_round is None or self.server_round <= s.gone_from_round  # Flower notices late
        ]

    def get_node_ids(self) -> list[int]:
        return [n.node_id for n in self.get_nodes()]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Each site answers at once; its reply waits for ``pull_messages`` (None: it stays silent)."""
        by_id = {s.node_id: s for s in self.sites}
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            ids.append(message.metadata.message_id)
            self.sent.append(message)
            config = message.content.config_records.get("config")
            if config is not None and "server-round" in config:
                self.server_round = int(config["server-round"])
            if message.metadata.message_type == "query":
                self.queried = True
            if (reply := by_id[message.metadata.dst_node_id].reply(message, self.server_round)) is not None:
                self._replies[message.metadata.message_id] = reply
        return ids
