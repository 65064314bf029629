"""Server-side screening of site replies, on real Flower Message objects."""

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp.strategy import FedAvg

from server.federation import weighted_means
from server.screening import DropoutReports, screen_replies
from server.site_identity import SiteIdentities


def reply(
    node: int, content: RecordDict | None = None, error: Error | None = None, kind: str = "train", to: int = 0
) -> Message:
    """A message from ``node`` to ``to``; as a reply it answers the message sent to ``node`` (id ``to-{node}``)."""
    metadata = Metadata(
        run_id=1,
        message_id=f"to-{to}" if node == 0 else f"m{node}",
        src_node_id=node,
        dst_node_id=to,
        reply_to_message_id=f"to-{node}",
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
            "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5, "seconds": 1.0} | (extra_metrics or {})),
            "site": ConfigRecord({"name": site}),
        }
    )


def sent_to(*nodes: int) -> list[Message]:
    return [reply(0, update(), to=node) for node in nodes]


def screen(replies, phase="train", reference=GLOBAL, names=None, sent=None, identities=None):
    """Screen ``replies`` from an unauthenticated run in which node i is named ``names[i]``."""
    identities = identities or SiteIdentities()
    for node, name in (names or {}).items():
        identities._bind(node, name, authenticated=False)
    nodes = sent if sent is not None else [r.metadata.src_node_id for r in replies]
    screened = screen_replies(sent_to(*nodes), replies, phase, reference, identities, timeout=600)
    return [r.message for r in screened.accepted], screened.rejected


def test_a_well_formed_update_is_accepted():
    accepted, rejected = screen([reply(1, update())])
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
        # Flower refuses to aggregate replies whose metrics differ in keys: one site would stop the round.
        (update(extra_metrics={"my-own-metric": 1.0}), "training metrics must be exactly"),
    ],
)
def test_malformed_or_poisoned_updates_are_rejected_with_the_reason(content, reason):
    content["site"] = ConfigRecord({"name": "h2"})
    accepted, rejected = screen([reply(1, update()), reply(2, content)], names={2: "h2"})
    assert len(accepted) == 1 and accepted[0].metadata.src_node_id == 1
    assert [(r.node_id, r.site, r.phase, r.cause) for r in rejected] == [(2, "h2", "train", "invalid")]
    assert reason in rejected[0].reason


def test_an_update_missing_a_training_metric_is_rejected_and_the_rest_aggregate():
    partial = update()
    del partial["metrics"]["seconds"]
    partial["site"] = ConfigRecord({"name": "h2"})
    accepted, rejected = screen([reply(1, update()), reply(2, partial), reply(3, update())], names={2: "h2"})
    assert [m.metadata.src_node_id for m in accepted] == [1, 3] and [r.node_id for r in rejected] == [2]
    assert "got ['num-examples', 'train_loss']" in rejected[0].reason
    FedAvg().aggregate_train(1, accepted)  # what an unscreened mix of keys made raise


def test_wrong_keys_and_error_replies_are_rejected():
    missing = update()
    del missing["arrays"]["b"]
    accepted, rejected = screen(
        [reply(1, missing), reply(2, error=Error(code=2, reason="ClientApp raised SiteFailure"))], names={2: "h2"}
    )
    assert accepted == []
    assert "missing ['b']" in rejected[0].reason
    assert rejected[1].site == "h2" and rejected[1].cause == "error" and "SiteFailure" in rejected[1].reason


def test_a_refused_round_is_a_rejection_naming_the_reason():
    refused = RecordDict(
        {"metrics": MetricRecord({"num-examples": 1}), "refused": ConfigRecord({"reason": "privacy budget exhausted"})}
    )
    _, rejected = screen([reply(1, refused)])
    assert rejected[0].reason == "site refused the round: privacy budget exhausted"
    assert rejected[0].cause == "refused"


def test_evaluation_replies_may_lack_auroc_at_a_one_class_site_and_the_mean_skips_it():
    good = RecordDict({"metrics": MetricRecord({"num-examples": 30, "auroc": 0.8, "loss": 0.5})})
    one_class = RecordDict({"metrics": MetricRecord({"num-examples": 10, "auroc": float("nan"), "loss": 0.3})})
    accepted, rejected = screen(
        [reply(1, good, kind="evaluate"), reply(2, one_class, kind="evaluate")], "evaluate", reference=None
    )
    assert len(accepted) == 2 and rejected == []
    means = weighted_means(accepted)
    assert means["auroc"] == pytest.approx(0.8)
    assert means["loss"] == pytest.approx((30 * 0.5 + 10 * 0.3) / 40)


def test_sites_asked_but_silent_are_named_with_the_wait():
    _, rejected = screen([reply(2, update(site="h2"))], names={1: "h1", 3: "h3"}, sent=[1, 2, 3])
    assert [(r.node_id, r.site, r.phase, r.reason, r.cause) for r in rejected] == [
        (1, "h1", "train", "no reply within 600 s", "silent"),
        (3, "h3", "train", "no reply within 600 s", "silent"),
    ]


def superlink_says_node_unavailable(node: int) -> Message:
    """Flower's own reply for a node whose heartbeats stopped: sent by the SuperLink, not by the node."""
    gone = reply(SUPERLINK_NODE_ID, error=Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"))
    gone.metadata.__dict__["_reply_to_message_id"] = f"to-{node}"
    return gone


def test_a_site_gone_offline_is_reported_once_as_gone_under_its_own_name():
    _, rejected = screen(
        [reply(1, update(site="h1")), superlink_says_node_unavailable(2)], names={1: "h1", 2: "h2"}, sent=[1, 2]
    )
    # Before: one report named "node-1" (the SuperLink) as having failed, a second one said
    # h2 gave "no reply within 600 s", which was false.
    assert [(r.node_id, r.site, r.cause) for r in rejected] == [(2, "h2", "offline")]
    assert rejected[0].reason == "site went offline before replying (its heartbeats stopped)"


def test_a_dropout_is_reported_once_until_the_site_is_back():
    identities = SiteIdentities()
    for node, name in {1: "h1", 2: "h2"}.items():
        identities._bind(node, name, authenticated=False)
    reports = DropoutReports()

    def phase(replies):
        return reports.first_reports(screen_replies(sent_to(1, 2), replies, "train", GLOBAL, identities, timeout=60))

    first = phase([reply(1, update(site="h1")), superlink_says_node_unavailable(2)])
    again = phase([reply(1, update(site="h1"))])  # still away (now silent): not reported again
    back = phase([reply(1, update(site="h1")), reply(2, update(site="h2"))])
    away_again = phase([reply(1, update(site="h1"))])
    assert [(r.site, r.cause) for r in first] == [("h2", "offline")]
    assert again == [] and back == []
    assert [(r.site, r.cause, r.reason) for r in away_again] == [("h2", "silent", "no reply within 60 s")]


def test_a_normalisation_reply_needs_finite_moments_and_a_schema():
    def query_reply(moment: float, with_schema: bool = True) -> Message:
        content = RecordDict(
            {
                "moments": ArrayRecord({"value_sum": Array(np.array([1.0, moment]))}),
                "metrics": MetricRecord({"num-examples": 5}),
                "site": ConfigRecord({"name": "h1"}),
            }
        )
        if with_schema:
            content["schema"] = ConfigRecord({"variables": ["HR"], "static": [], "dataset": "synthetic"})
        return reply(1, content, kind="query")

    assert screen([query_reply(2.0)], "query", reference=None)[1] == []
    assert screen([query_reply(np.nan)], "query", None)[1][0].reason == "normalisation moments hold non-finite values"
    assert "a 'schema'" in screen([query_reply(2.0, with_schema=False)], "query", None)[1][0].reason
