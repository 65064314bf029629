"""The hospital's Flower ClientApp: moves records in and out, and nothing else.

Handlers:
- ``query``: the site's normalisation sums (counts, sums, sums of squares per variable of its
  training stays) and its data schema, so the coordinator can build global z-scores and the
  model without any value leaving the site; under secure aggregation the sums travel masked
  instead (``client.secure_aggregation``), and the query answers with the schema alone;
- ``train``: local epochs from the received global model, returns weights and metrics;
- ``evaluate``: loss, AUROC, AUPRC and n of the received model on the site's test stays.

Failures in local data are logged here in full and reported to the coordinator only by kind:
an error message naming a file and line of patient data must not leave the hospital.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import make_audit_mod
from client.partition import open_partition
from client.secure_aggregation import is_required, local_moments, make_secure_aggregation_mod
from client.site import LocalData, SiteConfigError, SiteSettings, open_site
from client.training import (
    ModelMismatchError,
    build_model,
    clipped_as_asked,
    evaluate_locally,
    train_locally,
    weights_of,
)
from hymate.data import DataError
from hymate.local_plan import LocalPlan, PlanError
from hymate.privacy import LedgerError, PrivacyBudgetExhausted
from hymate.weight_vector import WEIGHTS_KEY, WeightLayoutError, from_vector, to_vector

log = logging.getLogger(__name__)


class SiteFailure(RuntimeError):
    """What the coordinator is told when a site fails: the kind of failure, no local detail."""


def reported_safely(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Keep local detail local: only problems with what the coordinator sent are echoed back."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except (PlanError, ModelMismatchError, LedgerError):
            raise
        except (DataError, SiteConfigError, OSError) as e:
            log.error("site failed in %s: %s", handler.__name__, e)
            raise SiteFailure(f"local data or configuration problem ({type(e).__name__}); see the site's log") from None
        except Exception as e:
            log.exception("site failed in %s", handler.__name__)
            raise SiteFailure(f"site-side failure ({type(e).__name__}); see the site's log") from None

    return wrapped


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def received_weights(record: ArrayRecord, plan: LocalPlan, data: LocalData) -> dict[str, np.ndarray]:
    """The coordinator's model as named tensors, laid out as the model this site builds from the plan."""
    if list(record.keys()) != [WEIGHTS_KEY]:
        raise ModelMismatchError(f"received arrays {sorted(record.keys())[:3]}, expected one {WEIGHTS_KEY!r} vector")
    try:
        return from_vector(record[WEIGHTS_KEY].numpy(), weights_of(build_model(plan, data)))
    except WeightLayoutError as e:
        raise ModelMismatchError(f"received model does not fit the plan's model: {e}") from None


def resolve_site(context: Context) -> LocalData:
    """A deployed hospital (its ``--node-config``) or a simulated one (a partition of the
    dataset named by the run's ``simulation-manifest``, picked by Flower's ``partition-id``)."""
    manifest = context.run_config.get("simulation-manifest", "")
    if manifest and "partition-id" in context.node_config:
        return open_partition(str(manifest), int(context.node_config["partition-id"]))
    return open_site(SiteSettings.from_node_config(context.node_config))


def _site_record(data: LocalData) -> ConfigRecord:
    return ConfigRecord({"name": data.settings.display_name})


# The audit sees every reply last, as it leaves; secure-aggregation stages pass through
# Flower's SecAgg+ client inside it.
app = ClientApp(mods=[make_audit_mod(resolve_site), make_secure_aggregation_mod(resolve_site)])


@app.query()
@reported_safely
def query(msg: Message, context: Context) -> Message:
    data = resolve_site(context)
    variables, static = data.schema
    schema = ConfigRecord({"variables": list(variables), "static": list(static), "dataset": data.settings.dataset})
    provenance = {k: v for k, v in data.provenance().items() if k != "dataset"}
    content = RecordDict(
        {
            "schema": schema,
            "metrics": MetricRecord({"num-examples": len(data.train)} | provenance),
            "site": _site_record(data),
        }
    )
    if not is_required(context):
        content["moments"] = _to_record(local_moments(data).to_arrays())
    return Message(content, reply_to=msg)


@app.train()
@reported_safely
def train(msg: Message, context: Context) -> Message:
    data = resolve_site(context)
    config = msg.content["config"]
    plan = LocalPlan.from_record(config)
    started = time.perf_counter()
    try:
        outcome = train_locally(
            plan,
            data,
            received_weights(msg.content["arrays"], plan, data),
            server_round=int(config.get("server-round", 0)),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
        )
    except PrivacyBudgetExhausted as e:
        # A refusal is an answer, not a failure: the coordinator logs why and goes on without us.
        refusal = {"reason": e.reason, "dp-epsilon": e.epsilon_spent, "dp-target-epsilon": e.target_epsilon}
        return Message(RecordDict({"refused": ConfigRecord(refusal), "site": _site_record(data)}), reply_to=msg)
    sent = clipped_as_asked(to_vector(outcome.weights), msg.content["arrays"][WEIGHTS_KEY].numpy(), config)
    metrics = MetricRecord(
        {
            "num-examples": outcome.num_examples,
            "train_loss": outcome.train_loss,
            "seconds": time.perf_counter() - started,
        }
    )
    content = {
        "arrays": _to_record({WEIGHTS_KEY: sent}),
        "metrics": metrics,
        "site": _site_record(data),
    }
    if outcome.privacy is not None:
        # A ConfigRecord: DP and non-DP sites may differ here without breaking the strategy's
        # check that all MetricRecords share their keys.
        content["privacy"] = ConfigRecord(outcome.privacy)
    return Message(RecordDict(content), reply_to=msg)


@app.evaluate()
@reported_safely
def evaluate(msg: Message, context: Context) -> Message:
    data = resolve_site(context)
    plan = LocalPlan.from_record(msg.content["config"])
    started = time.perf_counter()
    metrics = evaluate_locally(plan, data, received_weights(msg.content["arrays"], plan, data))
    metrics["seconds"] = time.perf_counter() - started
    content = RecordDict({"metrics": MetricRecord(metrics), "site": _site_record(data)})
    return Message(content, reply_to=msg)
