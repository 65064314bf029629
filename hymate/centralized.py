"""Centralized (pooled) training: the upper reference every federation is compared against.

Normalisation statistics come from the training stays only, through the same ``MomentSums``
a federation exchanges, so centralized and federated runs normalise identically.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from hymate.data.batches import StayDataset, make_loader
from hymate.data.normalization import MomentSums, Normalizer
from hymate.data.stays import StayTable, concat_tables
from hymate.model import HyMaTE, ModelOptions
from hymate.model_bundle import initial_weights
from hymate.train import (
    Evaluation,
    FitResult,
    TrainConfig,
    evaluate,
    fit,
    positive_class_weight,
    select_device,
)

log = logging.getLogger(__name__)


@dataclass
class CentralizedResult:
    model: HyMaTE
    normalizer: Normalizer
    fit: FitResult
    test: dict[str, Evaluation] = field(default_factory=dict)
    seconds: float = 0.0


def train_centralized(
    train: StayTable,
    val: StayTable,
    tests: dict[str, StayTable],
    model_options: ModelOptions,
    config: TrainConfig,
    init_from: str = "",
) -> CentralizedResult:
    """Fit HyMaTE on ``train`` with early stopping on ``val`` (or, with ``config.validation_stays``
    ``train``, on both for every epoch); evaluate on each named test set.

    ``init_from``: a checkpoint (``model.pt``) to start from instead of random weights, e.g. a
    pre-trained one; ``config.freeze`` then keeps part of it fixed. The normaliser is always the
    training stays' own, as in a federation (the sites' sums), so z-scores mean the same here and
    there; the checkpoint's is used only to score with it as it is (``ModelBundle``)."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    if config.validation_stays == "train":
        train, val = concat_tables([train, val], train.name), None
    normalizer = MomentSums.from_table(train).to_normalizer()
    pos_weight = config.pos_weight or positive_class_weight(train.labels)
    train_loader = make_loader(StayDataset(train, normalizer, config.max_events), config.batch_size, True, config.seed)
    val_loader = (
        None
        if val is None
        else make_loader(StayDataset(val, normalizer, config.max_events), 2 * config.batch_size, False)
    )
    model = HyMaTE(model_options.for_table(train))
    if init_from:
        model.load_state_dict(initial_weights(init_from, model_options, train.variables, train.static_names))
    log.info(
        "HyMaTE with %d parameters%s; %d train, %d validation stays",
        sum(p.numel() for p in model.parameters()),
        f" from {init_from}" if init_from else "",
        len(train),
        0 if val is None else len(val),
    )
    result = fit(model, train_loader, val_loader, config, pos_weight)
    device = select_device(config.device)
    test = {  # the model's risks are probabilities now (fit took the class weight out): unweighted loss
        name: evaluate(
            model,
            make_loader(StayDataset(table, normalizer, config.max_events), 2 * config.batch_size, False),
            device,
        )
        for name, table in tests.items()
    }
    return CentralizedResult(model, normalizer, result, test, time.perf_counter() - start)
