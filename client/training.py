"""One site's part of a round: check the received model, train it locally, evaluate it.

Arrays come in and go out as ``{parameter name: ndarray}``; the Flower layer (client/app.py)
only converts records. The received model is checked against the model this site builds
from the plan before a single weight is loaded: a coordinator bug or a tampered message
must fail loudly here, not train garbage on patient data.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_clip_model_update

from client.local_norms import load_local_norms, save_local_norms
from client.optimizer_state import load_optimizer_state, save_optimizer_state
from client.site import LocalData
from hymate.data.batches import StayDataset, make_loader
from hymate.data.stays import StayTable
from hymate.local_plan import LocalPlan
from hymate.model import HyMaTE
from hymate.privacy import PrivacyLedger, load_clip_bound, plan_round, save_clip_bound, train_private_round
from hymate.train import (
    Evaluation,
    ProximalTerm,
    TrainConfig,
    evaluate,
    make_optimizer,
    positive_class_weight,
    select_device,
    train_epoch,
)


class ModelMismatchError(ValueError):
    """The received weights do not fit the model the plan describes."""


def build_model(plan: LocalPlan, data: LocalData) -> HyMaTE:
    variables, static = data.schema
    return HyMaTE(plan.model.for_schema(len(variables), len(static)))


def load_checked(model: HyMaTE, arrays: Mapping[str, np.ndarray]) -> None:
    """Load ``arrays`` into ``model`` after checking names, shapes, dtypes and finiteness."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise ModelMismatchError(f"received model has missing {missing[:5]} / unexpected {unexpected[:5]} parameters")
    state = {}
    for name, reference in expected.items():
        array = np.asarray(arrays[name])
        if tuple(array.shape) != tuple(reference.shape):
            raise ModelMismatchError(f"parameter {name}: shape {tuple(array.shape)}, expected {tuple(reference.shape)}")
        if str(array.dtype) != str(reference.dtype).removeprefix("torch."):
            raise ModelMismatchError(f"parameter {name}: dtype {array.dtype}, expected {reference.dtype}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ModelMismatchError(f"parameter {name} holds non-finite values")
        state[name] = torch.from_numpy(array.copy())
    model.load_state_dict(state)


def received_model(plan: LocalPlan, data: LocalData, arrays: Mapping[str, np.ndarray]) -> HyMaTE:
    """The coordinator's model, checked, with this site's own normalisation layers under FedBN."""
    model = build_model(plan, data)
    load_checked(model, arrays)
    if plan.local_norms:
        load_local_norms(model, data.settings.state_dir)
    return model


def weights_of(model: HyMaTE) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy() for name, t in model.state_dict().items()}


def class_weight(plan: LocalPlan, data: LocalData) -> float:
    """The positive class's loss weight: the federation's, from the plan, or the site's own."""
    return plan.pos_weight or positive_class_weight(data.train.labels)


def _train_config(plan: LocalPlan, data: LocalData) -> TrainConfig:
    return TrainConfig(
        epochs=plan.local_epochs,
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        optimizer=plan.optimizer,
        momentum=plan.momentum,
        weight_decay=plan.weight_decay,
        clip_grad_norm=plan.clip_grad_norm,
        max_events=plan.max_events,
        device=data.settings.device,
        seed=plan.seed,
        freeze=plan.freeze,
    )


@dataclass(frozen=True)
class TrainOutcome:
    weights: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    privacy: dict[str, float] | None = None  # the site's DP spend after this round (DP sites only)


def train_locally(
    plan: LocalPlan, data: LocalData, arrays: Mapping[str, np.ndarray], server_round: int, proximal_mu: float = 0.0
) -> TrainOutcome:
    """``plan.local_epochs`` epochs of AdamW on the site's training stays, from the global weights.

    ``proximal_mu`` > 0 adds FedProx's proximal term (the coordinator's FedProx sends it). A
    site with a privacy budget trains with DP-SGD and may refuse the round
    (``PrivacyBudgetExhausted``) before touching its data.
    """
    config = _train_config(plan, data)
    seed = plan.seed + 1000 * server_round + zlib.crc32(data.settings.display_name.encode()) % 1000
    torch.manual_seed(seed)
    model = received_model(plan, data, arrays)
    device = select_device(config.device)
    model.to(device)
    dataset = StayDataset(data.train, plan.normalizer, config.max_events)
    optimizer = make_optimizer(model, config)
    if plan.keep_optimizer_state:
        load_optimizer_state(optimizer, config.optimizer, data.settings.state_dir)
    proximal = ProximalTerm.at(model, proximal_mu) if proximal_mu > 0 else None
    pos_weight = class_weight(plan, data)
    dp = data.settings.privacy(plan.planned_rounds)
    if dp is not None:
        ledger = PrivacyLedger.open(data.settings.state_dir, dp.target_epsilon, dp.delta, dp.accountant)
        round_plan = plan_round(dp, len(dataset), config.batch_size, config.epochs)
        result = train_private_round(
            model,
            dataset,
            optimizer,
            round_plan,
            dp,
            ledger,
            device=device,
            pos_weight=pos_weight,
            proximal=proximal,
            label=f"server round {server_round}",
            clip_bound=load_clip_bound(data.settings.state_dir) if dp.clip_quantile is not None else None,
        )
        if dp.clip_quantile is not None:
            save_clip_bound(data.settings.state_dir, result.clip_bound)
        train_loss, privacy = result.train_loss, result.metrics()
    else:
        loader = make_loader(dataset, config.batch_size, True, seed)
        losses = [
            train_epoch(model, loader, optimizer, device, pos_weight, config.clip_grad_norm, proximal)
            for _ in range(config.epochs)
        ]
        train_loss, privacy = float(np.mean(losses)), None
    if plan.local_norms:
        save_local_norms(model, data.settings.state_dir)
    if plan.keep_optimizer_state:
        save_optimizer_state(optimizer, config.optimizer, data.settings.state_dir)
    return TrainOutcome(weights_of(model.cpu()), len(data.train), train_loss, privacy)


def clipped_as_asked(trained: np.ndarray, received: np.ndarray, config: Mapping[str, object]) -> np.ndarray:
    """The trained vector with its update clipped to the norm the coordinator's client-side
    clipping wrapper (``dp-client-fixed``) sends, as Flower's ``fixedclipping_mod`` clips it;
    unchanged when no norm is asked for. Clipping only removes information, so a site may follow it."""
    if KEY_CLIPPING_NORM not in config:
        return trained
    clipped = [trained.astype(np.float64)]
    compute_clip_model_update(clipped, [received.astype(np.float64)], float(config[KEY_CLIPPING_NORM]))
    return clipped[0].astype(trained.dtype)


def evaluate_locally(plan: LocalPlan, data: LocalData, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Loss, AUROC, AUPRC and n of the received model on the site's test stays, and the same on
    its validation stays (``val-*``): what the coordinator keeps the best round by
    (server.round_selection), so that the test stays never choose the model they score."""
    model = received_model(plan, data, arrays)
    device = select_device(data.settings.device)
    model.to(device)
    pos_weight = class_weight(plan, data)

    def on(table: StayTable) -> Evaluation:
        loader = make_loader(StayDataset(table, plan.normalizer, plan.max_events), 2 * plan.batch_size, False)
        return evaluate(model, loader, device, pos_weight)

    test, val = on(data.test), on(data.val)
    # The positives count lets the coordinator put 95 % intervals on AUROC and AUPRC; like the
    # prevalence in the provenance it is an aggregate of the site's test stays.
    positives = int(data.test.labels.sum())
    return {
        "loss": test.loss,
        "auroc": test.auroc,
        "auprc": test.auprc,
        "num-examples": test.n,
        "num-positives": positives,
        "val-loss": val.loss,
        "val-auroc": val.auroc,
        "val-auprc": val.auprc,
        "val-num-examples": val.n,
    }
