"""Self-supervised pre-training of HyMaTE on unlabelled stays: forecast the next hours (STraTS).

Labels are scarce and private; measurements are plentiful, and public data sets (PhysioNet
2019: 40,000 ICU records from two hospital systems) hold millions of them. Pre-training teaches
the whole encoder (triplet embedding, Mamba and attention blocks, pooling, static encoder)
what ICU time series look like, on public stays, so that a private federation starts from it
(``--init-from``) instead of from random weights, and spends none of a site's privacy budget on
learning it.

The task, after STraTS (Tipirneni & Reddy, 2022): cut a stay at a random event time ``t``
(after its first time stamp), show the model the events before ``t``, and ask for every
variable's mean z-scored value over ``[t, t + forecast_hours)``; the loss is the mean squared
error over the variables measured in that window. Each epoch draws new cuts; validation stays
keep fixed ones, so the validation loss is comparable across epochs. The forecast head reads
``HyMaTE.encode`` and is discarded: the checkpoint is a plain HyMaTE (``ModelBundle``) whose
classification head is still random, with the normaliser and vocabulary it was trained in.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hymate.allocator import return_large_blocks_to_os, trim_heap
from hymate.data.batches import Batch, EncodedStay, LengthBucketSampler, collate_stays
from hymate.data.normalization import MomentSums, Normalizer
from hymate.data.splits import split_stays
from hymate.data.stays import StayTable
from hymate.model import HyMaTE, HyMaTEConfig, ModelOptions
from hymate.model_bundle import ModelBundle
from hymate.settings_fields import default_of, setting
from hymate.train import TrainConfig, make_optimizer, select_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """How long and how hard to pre-train; bounded by wall time as well as by epochs."""

    epochs: int = setting(20, help="passes over the pre-training stays (each draws new cut times)")
    batch_size: int = setting(64)
    learning_rate: float = setting(1e-3, help="AdamW learning rate")
    weight_decay: float = setting(default_of(TrainConfig, "weight_decay"))
    clip_grad_norm: float = setting(default_of(TrainConfig, "clip_grad_norm"))
    max_events: int = setting(400, help="events of history kept per sample (the most recent)")
    forecast_hours: float = setting(2.0, help="forecast every variable over this many hours after the cut")
    val_fraction: float = setting(0.05, help="stays held out to pick the best epoch by forecast loss")
    max_minutes: float = setting(
        20.0,
        help="stop after this much wall time; the best epoch so far is kept (the learning-rate schedule is "
        "re-fitted to the pace, so a bound that could bind makes the result depend on the machine's load)",
    )
    seed: int = setting(0)
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_events"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "forecast_hours", "max_minutes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class ForecastBatch:
    inputs: Batch
    target: torch.Tensor  # (B, V) mean z-scored value of each variable in the forecast window
    target_mask: torch.Tensor  # (B, V) True where the variable was measured there

    def to(self, device: torch.device) -> ForecastBatch:
        return ForecastBatch(self.inputs.to(device), self.target.to(device), self.target_mask.to(device))


class ForecastDataset(Dataset):
    """Stays cut at a random event time: the history before the cut, the next hours as targets.

    Only stays with events at two or more time stamps can be cut. ``fixed_cuts``: the same cut
    for a stay every time (validation); otherwise a new one on each draw.
    """

    def __init__(
        self,
        table: StayTable,
        normalizer: Normalizer,
        max_events: int,
        forecast_hours: float,
        seed: int = 0,
        fixed_cuts: bool = False,
    ):
        self.table = table
        self.max_events = max_events
        self.forecast_hours = forecast_hours
        self.n_variables = len(table.variables)
        self._values = normalizer.normalize_values(table.variable_ids, table.values)
        self._static, self._static_mask = normalizer.normalize_static(table.static)
        starts, ends, n = table.offsets[:-1], table.offsets[1:], table.n_events
        self.rows = np.zeros(0, dtype=np.int64)
        if n:
            first, last = table.times[np.minimum(starts, n - 1)], table.times[np.maximum(ends - 1, 0)]
            self.rows = np.flatnonzero((ends - starts >= 2) & (last > first))
        self.seed = seed
        self.fixed_cuts = fixed_cuts
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        return np.minimum(self.table.lengths[self.rows], self.max_events)

    def __getitem__(self, k: int) -> tuple[EncodedStay, np.ndarray, np.ndarray]:
        i = int(self.rows[k])
        a, b = int(self.table.offsets[i]), int(self.table.offsets[i + 1])
        times = self.table.times[a:b]
        rng = np.random.default_rng((self.seed, k)) if self.fixed_cuts else self._rng
        cut = times[rng.integers(np.searchsorted(times, times[0], side="right"), len(times))]
        history_end = a + int(np.searchsorted(times, cut, side="left"))
        target_end = a + int(np.searchsorted(times, cut + self.forecast_hours, side="left"))
        start = max(a, history_end - self.max_events)
        ids = self.table.variable_ids[history_end:target_end].astype(np.int64)
        counts = np.bincount(ids, minlength=self.n_variables + 1)[1:]
        sums = np.bincount(ids, weights=self._values[history_end:target_end], minlength=self.n_variables + 1)[1:]
        target = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(np.float32)
        history = EncodedStay(
            times=self.table.times[start:history_end],
            variables=self.table.variable_ids[start:history_end],
            values=self._values[start:history_end],
            static=self._static[i],
            static_mask=self._static_mask[i],
            label=0.0,
        )
        return history, target, counts > 0


def collate_forecasts(samples: Sequence[tuple[EncodedStay, np.ndarray, np.ndarray]]) -> ForecastBatch:
    return ForecastBatch(
        collate_stays([s[0] for s in samples]),
        torch.from_numpy(np.stack([s[1] for s in samples])),
        torch.from_numpy(np.stack([s[2] for s in samples])),
    )


def forecast_loader(dataset: ForecastDataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    sampler = LengthBucketSampler(dataset.lengths, batch_size, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_forecasts)


class Forecaster(nn.Module):
    """A HyMaTE encoder with a linear forecast head over ``HyMaTE.encode``'s stay vector."""

    def __init__(self, config: HyMaTEConfig):
        super().__init__()
        self.encoder = HyMaTE(config)
        self.forecast = nn.Linear(2 * config.d_model, config.n_variables)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.forecast(self.encoder.encode(batch)[0])


def masked_mse(prediction: torch.Tensor, batch: ForecastBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared errors over measured targets, their count)."""
    mask = batch.target_mask.to(prediction.dtype)
    return (((prediction - batch.target) ** 2) * mask).sum(), mask.sum()


@torch.no_grad()
def forecast_loss(model: Forecaster, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """(the model's mean squared error, that of always forecasting the training mean, z = 0)."""
    model.eval()
    total = count = baseline = 0.0
    for batch in loader:
        batch = batch.to(device)
        error, n = masked_mse(model(batch.inputs), batch)
        total, count = total + error.item(), count + n.item()
        baseline += ((batch.target**2) * batch.target_mask).sum().item()
    return total / max(count, 1.0), baseline / max(count, 1.0)


@dataclass
class PretrainResult:
    bundle: ModelBundle
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    stays: dict[str, int] = field(default_factory=dict)


def pretrain(table: StayTable, model_options: ModelOptions, config: PretrainConfig) -> PretrainResult:
    """Pre-train on ``table``'s stays (labels unused); the result keeps the epoch of lowest
    validation forecast loss, as a HyMaTE bundle in ``table``'s vocabulary."""
    start = time.perf_counter()
    deadline = start + 60.0 * config.max_minutes
    torch.manual_seed(config.seed)
    split = split_stays(table, fractions=(1 - config.val_fraction, config.val_fraction, 0.0), seed=config.seed)
    train, val = table.subset(split.train), table.subset(split.val)
    normalizer = MomentSums.from_table(train).to_normalizer()
    train_set = ForecastDataset(train, normalizer, config.max_events, config.forecast_hours, config.seed)
    val_set = ForecastDataset(val, normalizer, config.max_events, config.forecast_hours, config.seed, fixed_cuts=True)
    if not len(train_set) or not len(val_set):
        raise ValueError(
            f"{table.name}: {len(train_set)} training and {len(val_set)} validation stays have events at two or "
            "more times; pre-training needs both (more stays, or a larger --val-fraction)"
        )
    train_loader = forecast_loader(train_set, config.batch_size, True, config.seed)
    val_loader = forecast_loader(val_set, 2 * config.batch_size, False)
    hymate_config = model_options.for_table(table)
    model = Forecaster(hymate_config)
    device = select_device(config.device)
    model.to(device)
    optimizer = make_optimizer(model, TrainConfig(learning_rate=config.learning_rate, weight_decay=config.weight_decay))
    # Cosine decay over the steps that fit: all epochs, or (re-estimated after every epoch from
    # the time a step took) those that fit in max_minutes, so a time-bounded run still ends cool.
    planned = [config.epochs * len(train_loader)]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / planned[0], 1.0)))
    )
    steps_done = 0
    log.info(
        "pre-training HyMaTE (%d parameters) on %d stays (%d held out), %d variables",
        sum(p.numel() for p in model.encoder.parameters()),
        len(train_set),
        len(val_set),
        len(table.variables),
    )
    best_loss, best_state, best_epoch, history = math.inf, None, 0, []
    for epoch in range(1, config.epochs + 1):
        return_large_blocks_to_os()
        model.train()
        total = count = 0.0
        out_of_time = False
        for batch in train_loader:
            batch = batch.to(device)
            optimizer.zero_grad(set_to_none=True)
            error, n = masked_mse(model(batch.inputs), batch)
            (error / n.clamp(min=1.0)).backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            steps_done += 1
            total, count = total + error.item(), count + n.item()
            if time.perf_counter() > deadline:
                out_of_time = True
                break
        trim_heap()
        per_step = (time.perf_counter() - start) / steps_done
        fit = steps_done + int((deadline - time.perf_counter()) / per_step)
        planned[0] = max(steps_done, min(config.epochs * len(train_loader), fit))
        val_loss, mean_loss = forecast_loss(model, val_loader, device)
        history.append(
            {
                "epoch": epoch,
                "train_mse": total / max(count, 1.0),
                "val_mse": val_loss,
                "val_mse_of_the_mean": mean_loss,
                "seconds": time.perf_counter() - start,
                "steps": steps_done,
                "complete": not out_of_time,
            }
        )
        log.info(
            "epoch %d (%d steps): train MSE %.4f, validation MSE %.4f (forecasting the mean: %.4f), %.0f s%s",
            epoch,
            steps_done,
            history[-1]["train_mse"],
            val_loss,
            mean_loss,
            history[-1]["seconds"],
            " (stopped by --max-minutes)" if out_of_time else "",
        )
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.encoder.state_dict())
        if out_of_time:
            break
    assert best_state is not None
    bundle = ModelBundle(
        config=hymate_config,
        state_dict={k: v.detach().cpu() for k, v in best_state.items()},
        normalizer=normalizer,
        variables=table.variables,
        static_names=table.static_names,
    )
    stays = {"train": len(train_set), "val": len(val_set), "not_cuttable": len(table) - len(train_set) - len(val_set)}
    return PretrainResult(bundle, history, best_epoch, time.perf_counter() - start, stays)
