"""Who a reply comes from: the name its node's key is registered under, never the name it reports.

With SuperNode authentication (hymate-server), every site's public key is registered under a
name before the run, and Flower tells the ServerApp each connected node's registered name
(``grid.get_nodes()``, ``NodeInfo.name``). That name is the site's identity everywhere:
provenance, metrics, privacy reports, rejections, the model card and the logs. A reply whose
own ``site/name`` differs is rejected; a second node with a name already taken is refused for
the run. In simulation and --insecure runs Flower knows no names: a node is then named by what
its first reply reports, and the model card marks those identities unauthenticated.

Once the normalisation statistics are fixed, the run's members are exactly the sites whose
moments shaped them. Any other node (one that connects later, one whose normalisation reply
was rejected) is refused for the run: it is not sent the model, and nothing it sends is
aggregated, so the model card's sites are the sites that shaped the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

log = logging.getLogger(__name__)

JOINED_LATE = "joined after the normalisation statistics were fixed; not part of this run"
NOT_IN_NORMALISER = (
    "its normalisation reply was not used, so its data did not shape the normaliser; not part of this run"
)
UNNAMED_KEY = "its key is registered without a name, and names come from keys in this federation; refused for this run"


@dataclass(frozen=True)
class Refusal:
    """A node kept out of the whole run, and why."""

    node_id: int
    site: str
    reason: str


@dataclass(frozen=True)
class SiteReply:
    """A reply together with the identity of the node it answers for."""

    node_id: int
    site: str
    message: Message


def claimed_name(message: Message) -> str | None:
    """The name a reply reports for its site (``site/name``), None if it reports none."""
    if message.has_error():
        return None
    try:
        return str(message.content["site"]["name"])
    except (KeyError, TypeError):
        return None


class SiteIdentities:
    """Node id -> site name for one run, the run's members, and the nodes refused for it.

    ``members``: the sites whose moments shaped the normaliser (known on resume; None while
    the normalisation query is still to be asked). ``on_refusal`` hears of every refusal once.
    """

    def __init__(
        self, members: Iterable[str] | None = None, on_refusal: Callable[[Refusal], None] | None = None
    ) -> None:
        self.names: dict[int, str] = {}
        self.authenticated: dict[str, bool] = {}
        self.refusals: dict[int, Refusal] = {}
        self.members: frozenset[str] | None = None if members is None else frozenset(members)
        self.keyed = False  # some node carries a registered name: names come from keys in this run
        self.connected: set[int] = set()
        self.on_refusal = on_refusal

    def name_of(self, node_id: int) -> str:
        if node_id in self.names:
            return self.names[node_id]
        if node_id in self.refusals:
            return self.refusals[node_id].site
        return f"node-{node_id}"

    def admits(self, node_id: int) -> bool:
        return node_id not in self.refusals

    def observe(self, nodes: Iterable[NodeInfo]) -> list[Refusal]:
        """Take note of the connected nodes: bind each registered name to its node, refuse a
        second node with a name already taken (the one that connected later) and, once the
        normaliser is fixed, any node that is not one of its sites. Returns the new refusals."""
        nodes = sorted(nodes, key=lambda n: (n.last_activated_at, n.node_id))
        self.connected = {n.node_id for n in nodes}
        self.keyed = self.keyed or any(n.name for n in nodes)
        new = []
        for node in nodes:
            if node.node_id in self.names or node.node_id in self.refusals:
                continue
            if not node.name:
                if self.keyed:
                    new.append(self._refuse(node.node_id, f"node-{node.node_id}", UNNAMED_KEY))
                continue  # an unauthenticated run: the node's first reply names it
            holder = self._holder(node.name)
            if holder is not None:
                reason = (
                    f"a second node (node {node.node_id}) with a key registered as {node.name} connected while "
                    f"node {holder} is {node.name}; refused for this run"
                )
                new.append(self._refuse(node.node_id, node.name, reason))
            elif self.members is not None and node.name not in self.members:
                new.append(self._refuse(node.node_id, node.name, JOINED_LATE))
            else:
                self._bind(node.node_id, node.name, authenticated=True)
        return new

    def check(self, node_id: int, message: Message) -> str | None:
        """Why a reply from ``node_id`` must not be used as that site's, or None if it may.

        In an unauthenticated run the first reply that names a node binds the name to it."""
        if node_id in self.refusals:
            return self.refusals[node_id].reason
        claimed = claimed_name(message)
        bound = self.names.get(node_id)
        if bound is not None:
            if claimed is None or claimed == bound:
                return None
            if self.authenticated[bound]:
                return f"claims to be {claimed} but its key is registered as {bound}"
            return f"claims to be {claimed} but joined this run as {bound}"
        if claimed is None:
            return None  # an error reply from a node not yet named: reported under its node id
        if self.keyed:
            return self._refuse(node_id, f"node-{node_id}", UNNAMED_KEY).reason
        holder = self._holder(claimed)
        if holder is not None:
            reason = (
                f"claims to be {claimed}, which node {holder} already is in this run "
                "(site names are not authenticated here); refused for this run"
            )
            return self._refuse(node_id, claimed, reason).reason
        if self.members is not None and claimed not in self.members:
            return self._refuse(node_id, claimed, JOINED_LATE).reason
        self._bind(node_id, claimed, authenticated=False)
        return None

    def fix_members(self, sites: Iterable[str]) -> list[Refusal]:
        """The normaliser is fixed from ``sites``: every other node is refused for the run."""
        self.members = frozenset(sites)
        new = []
        for node_id, name in list(self.names.items()):
            if name not in self.members:
                del self.names[node_id]
                new.append(self._refuse(node_id, name, NOT_IN_NORMALISER))
        return new

    def identity_kinds(self) -> dict[str, str]:
        """How each named site's identity was established, for the model card."""
        return {
            site: "registered key" if authenticated else "self-reported (unauthenticated)"
            for site, authenticated in sorted(self.authenticated.items())
        }

    def _holder(self, name: str) -> int | None:
        """The node that is ``name`` in this run: for ever when the name comes from a key (a
        restarted site keeps its node id), while connected when it was only reported (a
        restarted site comes back as a new node)."""
        for node_id, bound in self.names.items():
            if bound == name and (self.authenticated[bound] or node_id in self.connected):
                return node_id
        return None

    def _bind(self, node_id: int, name: str, authenticated: bool) -> None:
        for other, bound in list(self.names.items()):
            if bound == name:  # an unauthenticated site that came back as a new node
                del self.names[other]
        self.names[node_id] = name
        self.authenticated[name] = authenticated
        log.info("node %d is site %s (%s)", node_id, name, "registered key" if authenticated else "self-reported")

    def _refuse(self, node_id: int, site: str, reason: str) -> Refusal:
        refusal = Refusal(node_id, site, reason)
        self.refusals[node_id] = refusal
        log.warning("refused node %d (%s) for this run: %s", node_id, site, reason)
        if self.on_refusal is not None:
            self.on_refusal(refusal)
        return refusal


class AdmittedGrid(Grid):
    """The grid as the strategy sees it: only the nodes admitted to this run.

    Every look at the connected nodes goes through ``SiteIdentities.observe`` first, so a
    refused node is never sampled, sent the model or counted towards a quorum."""

    def __init__(self, grid: Grid, identities: SiteIdentities) -> None:
        self.inner = grid
        self.identities = identities

    def get_nodes(self) -> list[NodeInfo]:
        nodes = list(self.inner.get_nodes())
        self.identities.observe(nodes)
        return [n for n in nodes if self.identities.admits(n.node_id)]

    def get_node_ids(self) -> list[int]:
        return [n.node_id for n in self.get_nodes()]

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)
