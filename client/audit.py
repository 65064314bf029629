"""An outgoing-message guard: what may leave the hospital, checked and logged.

Every reply passes this Flower mod before it is sent. It allows only arrays the coordinator
sent (the model's parameters, same names and shapes) and the normalisation sums, metrics that
are single numbers, and text that names no stay or patient of the local data; anything else
blocks the reply. Each reply that leaves is
appended to ``<state-dir>/outgoing.jsonl`` (names, shapes and metric values, never weights)
so the hospital can show an auditor exactly what it sent. Each line also carries the run id,
the round (None for the normalisation query, which precedes round 1) and ``arrays_sha256``, a
digest of the arrays' exact contents (``arrays_digest``), so an auditor holding the weights
can prove which update left the site in which round.

Under secure aggregation (``client.secure_aggregation``) a reply may also carry Flower's SecAgg+
bytes (public keys, encrypted key shares, the masked vector, unmasking shares), and only in
SecAgg+'s own record of a SecAgg+ exchange; the line names the stage and counts and digests
those bytes. A site that requires secure aggregation sends no array in the clear at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.secure_aggregation import is_required
from client.site import LocalData
from hymate.data.normalization import MOMENT_ARRAYS

log = logging.getLogger(__name__)

MOMENT_ARRAY_NAMES = frozenset(MOMENT_ARRAYS)
#: The SecAgg+ fields that are bytes: keys, encrypted shares, the masked vector, key shares.
SECAGG_BYTES = frozenset(
    {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.CIPHERTEXT_LIST, Key.MASKED_PARAMETERS, Key.SHARE_LIST}
)

SiteResolver = Callable[[Context], LocalData]


class OutgoingMessageBlocked(RuntimeError):
    """A reply would have carried something that must not leave the site."""


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over arrays in name order: for each, its name, dtype, shape and C-order bytes.

    Each field is length-prefixed, so no two different sets of arrays hash alike by shifting
    bytes between fields. Reproducible from the weights alone (numpy and hashlib suffice).
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        for field_bytes in (
            name.encode(),
            array.dtype.str.encode(),
            json.dumps(list(array.shape)).encode(),
            array.tobytes(),
        ):
            digest.update(len(field_bytes).to_bytes(8, "big") + field_bytes)
    return digest.hexdigest()


def message_round(message: Message) -> int | None:
    """The round a coordinator's message belongs to: its config's ``server-round``, else its group id."""
    for record in message.content.config_records.values():
        if "server-round" in record:
            return int(record["server-round"])
    group = message.metadata.group_id
    return int(group) if group.isdigit() else None


def secure_stage(request: Message) -> str | None:
    """The SecAgg+ stage a request asks for (None: a plain exchange); read before the handlers run,
    since Flower's SecAgg+ client consumes it."""
    if not request.has_content() or RECORD_KEY_CONFIGS not in request.content.config_records:
        return None
    return str(request.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, ""))


def check_outgoing(
    request: Message, reply: Message, local_ids: frozenset[str], masked_only: bool = False, stage: str | None = None
) -> dict:
    """Raise OutgoingMessageBlocked if ``reply`` carries anything but allowed content; return its audit line.

    ``masked_only``: the site requires secure aggregation, so no array may leave in the clear.
    ``stage``: the SecAgg+ stage of the request (``secure_stage``), None for a plain exchange."""
    secure = stage is not None
    received = {key: tuple(a.shape) for record in request.content.array_records.values() for key, a in record.items()}
    content = reply.content
    line: dict = {
        "time": time.time(),
        "run_id": request.metadata.run_id,
        "round": message_round(request),
        "type": reply.metadata.message_type,
        "arrays": {},
        "arrays_sha256": None,
        "metrics": {},
        "text": {},
    }
    sent: dict[str, np.ndarray] = {}
    masked = hashlib.sha256()
    for record_name, record in content.array_records.items():
        for key, array in record.items():
            if masked_only:
                raise OutgoingMessageBlocked(
                    f"array {record_name}/{key} would leave in the clear; this site sends arrays only through secure "
                    "aggregation"
                )
            if key in MOMENT_ARRAY_NAMES and not received:
                pass
            elif received.get(key) != tuple(array.shape):
                raise OutgoingMessageBlocked(
                    f"array {record_name}/{key} {tuple(array.shape)} is neither a received parameter nor a moment sum"
                )
            line["arrays"][f"{record_name}/{key}"] = [array.dtype, list(array.shape)]
            sent[f"{record_name}/{key}"] = array.numpy()
    line["arrays_sha256"] = arrays_digest(sent) if sent else None
    if secure:
        line["stage"] = stage
    for record_name, record in content.metric_records.items():
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (int, float)) for v in values):
                raise OutgoingMessageBlocked(f"metric {record_name}/{key} is not numeric")
            if len(values) > 1:
                raise OutgoingMessageBlocked(f"metric {record_name}/{key} is a list: per-record values may not leave")
            line["metrics"][f"{record_name}/{key}"] = value
    for record_name, record in content.config_records.items():
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            if secure and record_name == RECORD_KEY_CONFIGS and key in SECAGG_BYTES:
                chunks = [v for v in values if isinstance(v, bytes)]
                for chunk in chunks:
                    masked.update(len(chunk).to_bytes(8, "big") + chunk)
                line.setdefault("secure_aggregation", {})[key] = [len(chunks), sum(map(len, chunks))]
                continue
            for v in values:
                if isinstance(v, bytes):
                    raise OutgoingMessageBlocked(f"config {record_name}/{key} carries raw bytes")
                if isinstance(v, str) and set(v.replace(",", " ").split()) & local_ids:
                    raise OutgoingMessageBlocked(f"config {record_name}/{key} names a local stay or patient")
            line["text"][f"{record_name}/{key}"] = value
    if "secure_aggregation" in line:
        line["secure_aggregation_sha256"] = masked.hexdigest()
    return line


def make_audit_mod(resolve_site: SiteResolver) -> Mod:
    """A Flower client mod that runs the handler, then checks and logs its reply before it leaves."""

    def audit_outgoing(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        stage = secure_stage(message)
        reply = call_next(message, context)
        if reply.has_error():
            return reply
        data = resolve_site(context)
        line = check_outgoing(message, reply, data.local_ids(), masked_only=is_required(context), stage=stage)
        data.settings.state_dir.mkdir(parents=True, exist_ok=True)
        with open(data.settings.state_dir / "outgoing.jsonl", "a") as f:
            f.write(json.dumps(line, default=str) + "\n")
        return reply

    return audit_outgoing
