"""Secure aggregation at the site: Flower's SecAgg+ client around the installed handlers.

Flower 1.42 runs SecAgg+ only on its legacy path: ``flwr.client.mod.secaggplus_mod`` takes the
four protocol stages (keys, key shares, masked vector, unmasking shares) and, in the third,
calls the handler for a legacy ``FitRes`` (parameters and a number of examples), masks it and
sends only the masked integers. This mod puts that protocol in front of the installed ClientApp:

- ``secaggplus_mod`` itself, unchanged, does the cryptography;
- an adapter turns the legacy instructions into what the handlers take, and the handler's reply
  into the payload the site masks (``hymate.secure_sums``): the model update and training loss,
  or the exactly encoded normalisation sums; nothing else of the reply's arrays leaves;
- a policy decides what the site accepts. A site that requires secure aggregation (its own
  ``secure-aggregation`` node-config key, or a run whose config asks for it) refuses a plain
  training request, whatever the coordinator sends, and sends no plain normalisation sums; the
  outgoing audit (``client.audit``) blocks any array leaving such a site in the clear. At the
  setup stage the site refuses a reconstruction threshold that is not a strict majority of the
  shares: with a majority, no coordinator can collect both the mask seed shares and the key
  shares of one site (each holder reveals one kind per round), which would unmask its update.

What it cannot stop: Flower's SecAgg+ assumes an honest-but-curious coordinator. One that
simulates sites of its own (it runs the SuperLink) can still isolate a site's update.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from copy import copy

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from client.site import LocalData, SiteConfigError, node_config_flag
from hymate.data import MomentSums
from hymate.secure_sums import (
    GRID_CLIPPING_RANGE,
    GRID_QUANTIZATION_RANGE,
    PHASE_KEY,
    PHASE_NORMALISATION,
    PHASE_TRAIN,
    encode,
    training_payload,
)
from hymate.weight_vector import WEIGHTS_KEY

log = logging.getLogger(__name__)

#: The node-config key with which a site requires secure aggregation, and the run-config key
#: with which a coordinator announces it (the same word on both sides).
SECURE_AGGREGATION_KEY = "secure-aggregation"
#: Records of a handler's reply that travel beside the masked vector, in the clear: the site's
#: name (its identity is checked against its key) and its DP spend (for the model card).
CLEAR_RECORDS = ("site", "privacy")

SiteResolver = Callable[[Context], LocalData]
FITINS = "fitins"


class SecureAggregationRefused(RuntimeError):
    """The site will not take part in this exchange; the message (sent as the reply) says why."""


def is_required(context: Context) -> bool:
    """Whether this site may send updates and sums only masked: its own setting, or the run's
    (a coordinator that announced secure aggregation gets no plain update in that run either)."""
    try:
        own = node_config_flag(context.node_config, SECURE_AGGREGATION_KEY)
    except SiteConfigError:
        own = True  # a malformed setting errs on the safe side (the site's start-up check names it)
    return own or context.run_config.get(SECURE_AGGREGATION_KEY) is True


def is_secure_message(message: Message) -> bool:
    return message.has_content() and RECORD_KEY_CONFIGS in message.content.config_records


def local_moments(data: LocalData) -> MomentSums:
    """The site's normalisation sums over its training stays (plain query and secure phase alike)."""
    return MomentSums.from_table(data.train)


def check_setup(configs: ConfigRecord) -> None:
    """Refuse protocol settings under which the coordinator could unmask a single site."""
    shares, threshold, sites = (int(configs.get(k, 0)) for k in (Key.SHARE_NUMBER, Key.THRESHOLD, Key.SAMPLE_NUMBER))
    if sites < 2:
        raise SecureAggregationRefused(f"secure aggregation over {sites} site(s) would reveal this site's update")
    if not (2 <= threshold <= shares) or 2 * threshold <= shares:
        raise SecureAggregationRefused(
            f"reconstruction threshold {threshold} of {shares} shares is not a strict majority: the coordinator "
            "could collect both kinds of shares of one site (raise --secagg-reconstruction-threshold above 0.5)"
        )


def make_secure_aggregation_mod(resolve_site: SiteResolver) -> Mod:
    """The mod that routes secure-aggregation stages through ``secaggplus_mod`` and enforces the policy."""

    def secure_aggregation(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        kind = message.metadata.message_type
        if not is_secure_message(message):
            if is_required(context) and kind == MessageType.TRAIN:
                raise SecureAggregationRefused(
                    "this site sends model updates only through secure aggregation, and this training request "
                    "is a plain one; refused"
                )
            return call_next(message, context)
        if kind != MessageType.TRAIN:
            raise SecureAggregationRefused(f"secure aggregation runs on training messages, not {kind!r}")
        configs = message.content.config_records[RECORD_KEY_CONFIGS]
        if configs.get(Key.STAGE) == Stage.SETUP:
            check_setup(configs)
        handler = functools.partial(_masked_payload, call_next=call_next, resolve_site=resolve_site)
        return secaggplus_mod(message, context, handler)

    return secure_aggregation


def _masked_payload(
    message: Message, context: Context, call_next: ClientAppCallable, resolve_site: SiteResolver
) -> Message:
    """What the site masks in the collect stage, as the legacy FitRes ``secaggplus_mod`` expects."""
    # Flower's legacy layout of FitIns ("fitins.parameters", "fitins.config"), read as records:
    # the training plan holds lists, which the legacy FitIns type does not.
    parameters = compat.arrayrecord_to_parameters(message.content[f"{FITINS}.parameters"], keep_input=True)
    config = dict(message.content[f"{FITINS}.config"])
    phase = config.pop(PHASE_KEY, None)
    data = resolve_site(context)
    protocol = context.state.config_records[RECORD_KEY_STATE]
    clear = RecordDict({"site": ConfigRecord({"name": data.settings.display_name})})
    if phase == PHASE_NORMALISATION:
        grid = (protocol["clipping_range"], protocol["target_range"], protocol["max_weight"])
        if grid != (GRID_CLIPPING_RANGE, GRID_QUANTIZATION_RANGE, 1.0):
            raise SecureAggregationRefused(f"normalisation sums need the exact-sum grid, not {grid}")
        sums = local_moments(data).to_arrays()
        payload, examples = encode(np.concatenate(list(sums.values()))), 1  # equal weights: a plain sum
    elif phase == PHASE_TRAIN:
        (received,) = parameters_to_ndarrays(parameters)
        arrays = ArrayRecord({WEIGHTS_KEY: Array(np.ascontiguousarray(received))})
        request = Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), metadata=copy(message.metadata)
        )
        reply = call_next(request, context)
        if reply.has_error():
            raise SecureAggregationRefused(f"training failed: {reply.error.reason}")
        content = reply.content
        if "refused" in content.config_records:
            raise SecureAggregationRefused(f"the site refused the round: {content['refused']['reason']}")
        update = content["arrays"][WEIGHTS_KEY].numpy().astype(np.float64) - received.astype(np.float64)
        limit = float(protocol["clipping_range"])
        largest = float(np.abs(update).max(initial=0.0))
        if not np.isfinite(update).all() or largest > limit:
            raise SecureAggregationRefused(
                f"this round's update reaches {largest:.3g}, beyond the secure-aggregation clipping range "
                f"{limit:g}; it would be clipped (raise --secagg-clipping-range)"
            )
        metrics = content["metrics"]
        payload, examples = training_payload(update, float(metrics["train_loss"])), int(metrics["num-examples"])
        for name in CLEAR_RECORDS:
            if name in content.config_records:
                clear[name] = content.config_records[name]
    else:
        raise SecureAggregationRefused(f"unknown secure-aggregation phase {phase!r}")
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([payload]), examples, {})
    out = compat.fitres_to_recorddict(fitres, keep_input=True)
    for name, record in clear.config_records.items():
        out[name] = record
    return Message(out, reply_to=message)
