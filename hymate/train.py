"""The local training and evaluation step, shared by centralized runs, clients and simulation.

One epoch is ``train_epoch``; ``fit`` adds early stopping on validation AUROC + AUPRC and
keeps the best weights. Federated clients call ``train_epoch`` directly for their local
epochs (with a ``ProximalTerm`` under FedProx, and an Opacus optimizer under DP, which then
owns the clipping).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from hymate.allocator import return_large_blocks_to_os, trim_heap
from hymate.data.batches import Batch
from hymate.metrics import auprc, auroc
from hymate.model import FREEZE_CHOICES, freeze, remove_class_weight
from hymate.settings_fields import check_choices, setting

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")  # the local optimisers a plan may name (make_optimizer builds them)
VALIDATION_USES = ("early-stop", "train")  # what centralized training does with the validation stays


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of local training."""

    epochs: int = setting(30, help="epochs of centralized and local training")
    batch_size: int = setting(32)
    learning_rate: float = setting(1e-3, help="learning rate of the local optimiser")
    # Under DP-SGD noise Adam's second moment tracks the noise, not the gradient's scale, so
    # every coordinate moves by about the learning rate whatever its signal: SGD with momentum
    # averages the noise away instead (bench/dp_utility.py measures both).
    optimizer: str = setting("adamw", choices=OPTIMIZERS, help="local optimiser: AdamW or SGD with momentum")
    momentum: float = setting(0.9, help="momentum of --optimizer sgd")
    weight_decay: float = setting(0.05)
    # The optimiser's gradient-norm clip (not DP's per-sample clip, which is the site's dp-max-grad-norm).
    clip_grad_norm: float = setting(1.0, help="clip the gradient's norm to this before each step")
    patience: int = setting(5, help="epochs without improvement before early stopping")
    # A booster early-stops inside its training stays; HyMaTE holds a fifth of them out to choose
    # its epoch. With a schedule that ends where the best epoch is (--epochs 5: best epochs 4-5),
    # the held-out stays are better spent on training.
    validation_stays: str = setting(
        "early-stop",
        choices=VALIDATION_USES,
        help="centralized and local-only training: stop early on the validation stays and keep the best "
        "epoch, or train on them too for all --epochs and keep the last (federated sites always keep them "
        "for --keep-round)",
    )
    # An exponential moving average of the weights (updated every step) smooths the last steps'
    # noise on small, noisy clinical sets; it is what early stopping and the final model then use.
    ema_decay: float = setting(
        0.0,
        help="centralized, local-only and personalised training (not a federation's sites): decay of an "
        "exponential moving average of the weights, which early stopping scores and the final model keeps (0: off)",
    )
    max_events: int = setting(880, help="events kept per stay (the most recent)")
    cosine_schedule: bool = True
    # Attention and the selective scan's step sizes start from random weights: a linear ramp of
    # the learning rate keeps the first steps' large, badly aimed updates from throwing them off.
    warmup_epochs: float = setting(
        0.0,
        help="centralized, local-only and personalised training: ramp the learning rate linearly from 0 over "
        "this many epochs (fractions allowed), then the cosine decay over the rest (0: off)",
    )
    pos_weight: float | None = None  # None: from the training labels, see positive_class_weight
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))
    seed: int = setting(0)
    freeze: str = setting(
        "none",
        choices=FREEZE_CHOICES,
        help="keep this part of a pre-trained model (--init-from) fixed: the triplet embeddings, or the "
        "whole sequence encoder (embeddings, Mamba and attention); pooling, statics and head always train",
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_events"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        check_choices(self, ("freeze", "optimizer", "validation_stays"))
        for name in ("momentum", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


# The TrainConfig fields the command lines (hymate-sim, bench/) have flags for: the seed comes
# from --seeds, and the schedule's shape and the class weight from the program.
TRAIN_FLAGS = (
    "epochs",
    "patience",
    "batch_size",
    "learning_rate",
    "optimizer",
    "momentum",
    "weight_decay",
    "clip_grad_norm",
    "max_events",
    "device",
    "freeze",
    "validation_stays",
    "ema_decay",
    "warmup_epochs",
)


def select_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def positive_class_weight(labels: np.ndarray) -> float:
    """sqrt(negatives / positives): a full inverse-prevalence weight overshoots calibration
    and ranks no better on 10-15 % prevalence outcomes, while no weight lets the majority
    class swamp the few positives of a small site."""
    return class_weight_of(int(np.sum(labels)), len(labels))


def class_weight_of(positives: int, stays: int) -> float:
    """``positive_class_weight`` from the counts alone (what a federation's sites report)."""
    negatives = stays - positives
    return math.sqrt(negatives / positives) if positives > 0 and negatives > 0 else 1.0


@dataclass
class ProximalTerm:
    """FedProx's ``mu/2 * ||w - w_global||^2``, anchored at the weights the round started from."""

    mu: float
    anchor: list[torch.Tensor]

    @classmethod
    def at(cls, model: nn.Module, mu: float) -> ProximalTerm:
        return cls(mu, [p.detach().clone() for p in model.parameters() if p.requires_grad])

    def __call__(self, model: nn.Module) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        return 0.5 * self.mu * sum(((p - a) ** 2).sum() for p, a in zip(params, self.anchor, strict=True))


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    pos_weight: float,
    max_grad_norm: float | None,
    proximal: ProximalTerm | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    averaged: AveragedModel | None = None,
) -> float:
    """One pass over ``batches``; returns the mean training loss per stay.

    ``max_grad_norm=None`` leaves clipping to the optimizer (Opacus clips per sample).
    ``averaged`` (an EMA of the weights) is updated after every step.
    Freed activations go back to the OS (``hymate.allocator``), so resident memory follows
    the largest batch instead of growing with heap fragmentation.
    """
    return_large_blocks_to_os()
    model.train()
    weight = torch.tensor(pos_weight, device=device)
    total, count = 0.0, 0
    for batch in batches:
        if len(batch) == 0:  # Poisson sampling can draw an empty batch
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()
            continue
        batch = batch.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(batch), batch.label, pos_weight=weight)
        objective = loss + proximal(model) if proximal is not None else loss
        objective.backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if averaged is not None:
            averaged.update_parameters(model)
        total += loss.item() * len(batch)
        count += len(batch)
    trim_heap()
    return total / max(count, 1)


@dataclass
class Evaluation:
    """Loss and discrimination of a model on a set of stays (probabilities kept for reports)."""

    loss: float
    auroc: float
    auprc: float
    n: int
    labels: np.ndarray = field(repr=False)
    probs: np.ndarray = field(repr=False)

    @property
    def score(self) -> float:
        """What early stopping maximises: AUROC + AUPRC (NaN counts as nothing)."""
        return float(np.nansum([self.auroc, self.auprc]))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device, pos_weight: float = 1.0) -> Evaluation:
    model.eval()
    weight = torch.tensor(pos_weight, device=device)
    logits, labels = [], []
    for batch in batches:
        batch = batch.to(device)
        logits.append(model(batch).float().cpu())
        labels.append(batch.label.cpu())
    logit = torch.cat(logits) if logits else torch.zeros(0)
    label = torch.cat(labels) if labels else torch.zeros(0)
    loss = F.binary_cross_entropy_with_logits(logit, label, pos_weight=weight.cpu()).item() if len(label) else math.nan
    probs, y = torch.sigmoid(logit).numpy(), label.numpy()
    return Evaluation(loss, auroc(y, probs), auprc(y, probs), len(y), y, probs)


@dataclass
class FitResult:
    """The epoch the model ends on, its validation scores (None when there were no validation
    stays to score: the last epoch is kept) and each epoch's losses and scores."""

    best_epoch: int
    best: Evaluation | None
    history: list[dict[str, float]]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum) over the parameters ``config.freeze`` leaves trainable (the
    frozen ones are marked ``requires_grad=False`` here, before any DP wrapper sees the model),
    with weight decay on weight matrices only (not on biases, norms or SSM parameters)."""
    freeze(model, config.freeze)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and not n.endswith("A_log")]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and not n.endswith("A_log"))]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def learning_rate_schedule(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The per-step factor on the learning rate: a linear warm-up over ``config.warmup_epochs``,
    then (``config.cosine_schedule``) a cosine decay to 0 at the last step, else constant."""
    steps = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if not warmup and not config.cosine_schedule:
        return None

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not config.cosine_schedule:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(steps - warmup, 1), 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(
    model: nn.Module,
    train_batches: Iterable[Batch],
    val_batches: Iterable[Batch] | None,
    config: TrainConfig,
    pos_weight: float,
) -> FitResult:
    """Train with early stopping on validation AUROC + AUPRC; the model ends on its best weights.
    Without ``val_batches`` every epoch runs and the model ends on the last. Under
    ``config.ema_decay`` the weights scored and kept are the moving average's. The model leaves
    with ``pos_weight`` taken out of its risks (``remove_class_weight``): what it predicts is a
    probability, and its ranking is the one validation chose."""
    device = select_device(config.device)
    model.to(device)
    optimizer = make_optimizer(model, config)
    scheduler = learning_rate_schedule(optimizer, config, len(train_batches))  # type: ignore[arg-type]
    averaged = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
        if config.ema_decay
        else None
    )
    scored = model if averaged is None else averaged.module
    best: Evaluation | None = None
    best_state, best_epoch, history = None, 0, []
    for epoch in range(1, config.epochs + 1):
        train_loss = train_epoch(
            model,
            train_batches,
            optimizer,
            device,
            pos_weight,
            config.clip_grad_norm,
            scheduler=scheduler,
            averaged=averaged,
        )
        if val_batches is None:
            history.append({"epoch": epoch, "train_loss": train_loss})
            log.info("epoch %d: train loss %.4f", epoch, train_loss)
            best_epoch = epoch
            continue
        val = evaluate(scored, val_batches, device, pos_weight)
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val.loss,
                "val_auroc": val.auroc,
                "val_auprc": val.auprc,
            }
        )
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f, AUROC %.4f, AUPRC %.4f",
            epoch,
            train_loss,
            val.loss,
            val.auroc,
            val.auprc,
        )
        if best is None or val.score > best.score:
            best, best_epoch, best_state = val, epoch, copy.deepcopy(scored.state_dict())
        elif epoch - best_epoch >= config.patience:
            log.info("early stop: no improvement for %d epochs (best epoch %d)", config.patience, best_epoch)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    elif averaged is not None:
        model.load_state_dict(averaged.module.state_dict())
    remove_class_weight(model.state_dict(), pos_weight)
    return FitResult(best_epoch, best, history)
