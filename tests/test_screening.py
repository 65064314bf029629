"""Server-side screening of site replies, on real Flower Message objects."""

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from server.federation import weighted_means
from server.screening import screen_replies, silent_sites


def reply(
    node: int, content: RecordDict | None = None, error: Error | None = None, kind: str = "train", to: int = 0
) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=to,
        reply_to_message_id="x",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=kind,
    )
    return Message(metadata=metadata, content=content) if error is None else Message(metadata=metadata, error=error)


GLOBAL = ArrayRecord({"w": Array(np.zeros((3, 2), np.float32)), "b": Array(np.zeros(2, np.float32))})


def update(w=None, b=None, n=10, site="h1", extra_metrics=None) -> RecordDict:
    arrays = {
        "w": w if w is not None else np.ones((3, 2), np.float32),
        "b": b if b is not None else np.ones(2, np.float32),
    }
    return RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5} | (extra_metrics or {})),
            "site": ConfigRecord({"name": site}),
        }
    )


def test_a_well_formed_update_is_accepted():
    accepted, rejected = screen_replies([reply(1, update())], "train", GLOBAL, {})
    assert len(accepted) == 1 and rejected == []


@pytest.mark.parametrize(
    "content, reason",
    [
        (update(w=np.full((3, 2), np.nan, np.float32)), "parameter w holds non-finite values"),
        (update(b=np.array([1.0, np.inf], np.float32)), "parameter b holds non-finite values"),
        (update(w=np.ones((2, 3), np.float32)), "parameter w: float32[2, 3], expected float32[3, 2]"),
        (update(w=np.ones((3, 2), np.float64)), "parameter w: float64[3, 2], expected float32[3, 2]"),
        (update(n=0), "num-examples must be a positive integer"),
        (update(extra_metrics={"train_loss": float("nan")}), "metric 'train_loss' is not finite"),
    ],
)
def test_malformed_or_poisoned_updates_are_rejected_with_the_reason(content, reason):
    accepted, rejected = screen_replies([reply(1, update()), reply(2, content)], "train", GLOBAL, {2: "h2"})
    assert len(accepted) == 1 and accepted[0].metadata.src_node_id == 1
    assert [(r.node_id, r.phase) for r in rejected] == [(2, "train")]
    assert reason in rejected[0].reason


def test_wrong_keys_and_error_replies_are_rejected():
    missing = RecordDict(
        {"arrays": ArrayRecord({"w": Array(np.ones((3, 2), np.float32))}), "metrics": MetricRecord({"num-examples": 3})}
    )
    accepted, rejected = screen_replies(
        [reply(1, missing), reply(2, error=Error(code=2, reason="ClientApp raised SiteFailure"))],
        "train",
        GLOBAL,
        {2: "h2"},
    )
    assert accepted == []
    assert "missing ['b']" in rejected[0].reason
    assert rejected[1].site == "h2" and "SiteFailure" in rejected[1].reason


def test_a_refused_round_is_a_rejection_naming_the_reason():
    refused = RecordDict(
        {"metrics": MetricRecord({"num-examples": 1}), "refused": ConfigRecord({"reason": "privacy budget exhausted"})}
    )
    _, rejected = screen_replies([reply(1, refused)], "train", GLOBAL, {})
    assert rejected[0].reason == "site refused the round: privacy budget exhausted"


def test_evaluation_replies_may_lack_auroc_at_a_one_class_site_and_the_mean_skips_it():
    good = RecordDict({"metrics": MetricRecord({"num-examples": 30, "auroc": 0.8, "loss": 0.5})})
    one_class = RecordDict({"metrics": MetricRecord({"num-examples": 10, "auroc": float("nan"), "loss": 0.3})})
    accepted, rejected = screen_replies(
        [reply(1, good, kind="evaluate"), reply(2, one_class, kind="evaluate")], "evaluate", None, {}
    )
    assert len(accepted) == 2 and rejected == []
    means = weighted_means(accepted)
    assert means["auroc"] == pytest.approx(0.8)
    assert means["loss"] == pytest.approx((30 * 0.5 + 10 * 0.3) / 40)


def test_sites_asked_but_silent_are_named_with_the_wait():
    sent = [reply(0, update(), to=node) for node in (1, 2, 3)]
    silent = silent_sites(sent, [reply(2, update())], "train", {1: "h1", 3: "h3"}, timeout=600)
    assert [(r.node_id, r.site, r.phase, r.reason) for r in silent] == [
        (1, "h1", "train", "no reply within 600 s"),
        (3, "h3", "train", "no reply within 600 s"),
    ]
