"""Screening site replies before anything is aggregated.

A reply is used only if it comes from the site it claims to be (``server.site_identity``) and
is exactly what the protocol expects: one ``arrays`` record with the global model's names,
shapes and dtypes and only finite values, and exactly ``TRAIN_METRICS`` (training), one ``metrics`` record of finite numbers
with a positive integer ``num-examples``, finite moment sums and a schema (normalisation).
Anything else (a site gone offline or silent, an error reply, a refused round, an impostor, a
malformed or poisoned update) becomes one ``Rejection`` that names the site, the true cause and
the reason, is logged, and stays out of the average.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from hymate.train_reply import TRAIN_METRICS
from server.site_identity import SiteIdentities, SiteReply

# Metrics that are legitimately undefined at a site whose test (or validation) stays hold one
# class only, or, for the validation loss, none.
MAY_BE_UNDEFINED = frozenset({"auroc", "auprc", "val-auroc", "val-auprc", "val-loss"})
# Rank metrics: a value outside [0, 1] is not a measurement (and must not choose the kept round).
RANK_METRICS = frozenset({"auroc", "auprc", "val-auroc", "val-auprc"})
# Cross-entropies: a negative one is not a measurement (and must not choose the kept round).
LOSS_METRICS = frozenset({"loss", "val-loss", "train_loss"})

#: Why a reply was not used: the site went away, stayed silent, failed, declined the round,
#: is not who it says it is, or sent something malformed.
CAUSES = ("offline", "silent", "error", "refused", "identity", "invalid")
#: Causes that mean "the site is not there": reported once, not again while it stays away.
DROPOUTS = frozenset({"offline", "silent"})


@dataclass(frozen=True)
class Rejection:
    node_id: int
    site: str
    phase: str
    reason: str
    cause: str = "invalid"


@dataclass
class Screened:
    """One phase's replies after screening."""

    accepted: list[SiteReply]  # what the strategy may aggregate
    verified: list[SiteReply]  # every reply from the site it claims to be (accepted or not)
    rejected: list[Rejection]


def error_reason(error: Error) -> tuple[str, str]:
    """(cause, reason) of an error reply: a site that went away is not a site that failed."""
    if error.code == ErrorCode.NODE_UNAVAILABLE:
        return "offline", "site went offline before replying (its heartbeats stopped)"
    if error.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE:
        return "offline", "the site's reply expired before it was collected"
    return "error", f"site reported an error: {error.reason}"


def _problem(message: Message, phase: str, reference: ArrayRecord | None) -> tuple[str, str] | None:
    """(cause, what is wrong) with a reply, or None if it may be used."""
    if message.has_error():
        return error_reason(message.error)
    content = message.content
    if "refused" in content.config_records:
        return "refused", f"site refused the round: {content['refused'].get('reason', 'no reason given')}"
    problem = _content_problem(content, phase, reference)
    return None if problem is None else ("invalid", problem)


def _content_problem(content: RecordDict, phase: str, reference: ArrayRecord | None) -> str | None:
    if len(content.metric_records) != 1 or "metrics" not in content.metric_records:
        return "reply must carry exactly one MetricRecord named 'metrics'"
    metrics = content["metrics"]
    n = metrics.get("num-examples")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return f"num-examples must be a positive integer, got {n!r}"
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) or (key in MAY_BE_UNDEFINED and math.isnan(v)) for v in values):
            return f"metric {key!r} is not finite ({value!r})"
        if key in RANK_METRICS and not all(math.isnan(v) or 0.0 <= v <= 1.0 for v in values):
            return f"metric {key!r} must lie in [0, 1], got {value!r}"
        if key in LOSS_METRICS and not all(math.isnan(v) or v >= 0.0 for v in values):
            return f"metric {key!r} must not be negative, got {value!r}"
    if phase == "query":
        # The moments are absent under secure aggregation (they travel masked); the federation
        # decides whether it needs them.
        if set(content.array_records) - {"moments"} or "schema" not in content.config_records:
            return "a normalisation reply must carry a 'schema' and no arrays but the 'moments'"
        if "moments" in content.array_records and not all(
            np.isfinite(a.numpy()).all() for a in content["moments"].values()
        ):
            return "normalisation moments hold non-finite values"
        return None
    if reference is None:
        if content.array_records:
            return "an evaluation reply must not carry arrays"
        return None
    if set(metrics) != TRAIN_METRICS:
        return f"training metrics must be exactly {sorted(TRAIN_METRICS)}, got {sorted(metrics)}"
    if len(content.array_records) != 1 or "arrays" not in content.array_records:
        return "reply must carry exactly one ArrayRecord named 'arrays'"
    arrays = content["arrays"]
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))[:3]
        extra = sorted(set(arrays.keys()) - set(reference.keys()))[:3]
        return f"update has missing {missing} / unexpected {extra} parameters"
    for name, expected in reference.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
            return f"parameter {name}: {got.dtype}{list(got.shape)}, expected {expected.dtype}{list(expected.shape)}"
        values = got.numpy()
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"parameter {name} holds non-finite values"
    return None


def screen_replies(
    sent: Iterable[Message],
    replies: Iterable[Message],
    phase: str,
    reference: ArrayRecord | None,
    identities: SiteIdentities,
    timeout: float,
) -> Screened:
    """Every node that was sent a message gets exactly one outcome: a usable reply or one
    rejection with its true cause (``reference``: the model sent for training, else None).

    A reply is matched to its node through the message it answers: Flower's own error reply for
    a node that went offline comes from the SuperLink (``src_node_id`` 1), not from the node,
    so matching by sender named the wrong site and reported the node a second time as silent.
    """
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    accepted: list[SiteReply] = []
    verified: list[SiteReply] = []
    rejected: list[Rejection] = []
    answered = set()
    for message in replies:
        node = destination.get(message.metadata.reply_to_message_id, message.metadata.src_node_id)
        answered.add(node)
        impostor = identities.check(node, message)
        site = identities.name_of(node)
        if impostor is not None:
            rejected.append(Rejection(node, site, phase, impostor, "identity"))
            continue
        reply = SiteReply(node, site, message)
        verified.append(reply)
        problem = _problem(message, phase, reference)
        if problem is None:
            accepted.append(reply)
        else:
            rejected.append(Rejection(node, site, phase, problem[1], problem[0]))
    rejected += [
        Rejection(node, identities.name_of(node), phase, f"no reply within {timeout:.0f} s", "silent")
        for node in sorted(set(destination.values()) - answered)
    ]
    return Screened(accepted, verified, rejected)


class DropoutReports:
    """Report a site that went away once, not in every phase and round until it is back."""

    def __init__(self) -> None:
        self.away: set[int] = set()

    def first_reports(self, screened: Screened) -> list[Rejection]:
        """``screened.rejected`` without repeated dropouts; a site that replied is back."""
        gone = {r.node_id for r in screened.rejected if r.cause in DROPOUTS}
        self.away -= {r.node_id for r in screened.verified} - gone
        kept = []
        for r in screened.rejected:
            if r.cause in DROPOUTS:
                if r.node_id in self.away:
                    continue
                self.away.add(r.node_id)
            kept.append(r)
        return kept
