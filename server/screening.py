"""Screening site replies before anything is aggregated.

A reply is accepted only if it is exactly what the protocol expects: one ``arrays`` record
with the global model's names, shapes and dtypes and only finite values (training), one
``metrics`` record of finite numbers with a positive integer ``num-examples``. Anything else
(an error reply, a refused round, a malformed or poisoned update) is turned into a
``Rejection`` that names the site and the reason, is logged, and stays out of the average.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

log = logging.getLogger(__name__)

# Metrics that are legitimately undefined at a site whose test stays hold one class only.
MAY_BE_UNDEFINED = frozenset({"auroc", "auprc"})


@dataclass(frozen=True)
class Rejection:
    node_id: int
    site: str
    phase: str
    reason: str


def site_of(message: Message, fallback: str) -> str:
    if message.has_error():
        return fallback
    try:
        return str(message.content["site"]["name"])
    except (KeyError, TypeError):
        return fallback


def _problem(message: Message, reference: ArrayRecord | None) -> str | None:
    """What is wrong with a reply, or None if it may be aggregated."""
    if message.has_error():
        return f"site reported an error: {message.error.reason}"
    content = message.content
    if "refused" in content.config_records:
        return f"site refused the round: {content['refused'].get('reason', 'no reason given')}"
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
    if reference is None:
        if content.array_records:
            return "an evaluation reply must not carry arrays"
        return None
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


def silent_sites(
    sent: Iterable[Message], replies: Iterable[Message], phase: str, sites: dict[int, str], timeout: float
) -> list[Rejection]:
    """Sites that were asked but did not answer in time (gone, restarting, or too slow), so a
    round's record names every site that was asked and not only the ones that answered."""
    answered = {reply.metadata.src_node_id for reply in replies}
    return [
        Rejection(node, sites.get(node, f"node-{node}"), phase, f"no reply within {timeout:.0f} s")
        for node in sorted({message.metadata.dst_node_id for message in sent} - answered)
    ]


def screen_replies(
    replies: Iterable[Message], phase: str, reference: ArrayRecord | None, sites: dict[int, str]
) -> tuple[list[Message], list[Rejection]]:
    """Split replies into the acceptable ones and rejections (``reference``: the model sent, None for evaluation)."""
    accepted, rejected = [], []
    for message in replies:
        node = message.metadata.src_node_id
        site = site_of(message, sites.get(node, f"node-{node}"))
        problem = _problem(message, reference)
        if problem is None:
            accepted.append(message)
        else:
            log.warning("round %s: rejected %s reply of %s: %s", phase, phase, site, problem)
            rejected.append(Rejection(node, site, phase, problem))
    return accepted, rejected
