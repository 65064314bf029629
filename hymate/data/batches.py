"""Padded batches of stays (DESIGN.md section 2): what the model consumes.

Values are z-scored once per dataset (not per batch), stays longer than ``max_events`` keep
their most recent events, and padding always goes after the last real event so the causal
Mamba scan never mixes it into real positions. Batches are formed from stays of similar
length (bucketing), which on a CPU halves the time spent on padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hymate.data.normalization import Normalizer
from hymate.data.stays import PADDING_VARIABLE_ID, StayTable


@dataclass
class Batch:
    """Padded tensors of B stays with at most L events each."""

    times: torch.Tensor  # (B, L) float32, hours since admission
    variables: torch.Tensor  # (B, L) int64, 0 = padding
    values: torch.Tensor  # (B, L) float32, z-scored
    mask: torch.Tensor  # (B, L) bool, True for real events
    static: torch.Tensor  # (B, S) float32, z-scored, 0 where missing
    static_mask: torch.Tensor  # (B, S) bool, True where present
    label: torch.Tensor  # (B,) float32

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.label.shape[0]


@dataclass(frozen=True)
class EncodedStay:
    times: np.ndarray
    variables: np.ndarray
    values: np.ndarray
    static: np.ndarray
    static_mask: np.ndarray
    label: float


class StayDataset(Dataset):
    """Stays of a table, normalised once, each capped at its ``max_events`` latest events."""

    def __init__(self, table: StayTable, normalizer: Normalizer, max_events: int = 1024):
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        self.table = table
        self.max_events = max_events
        self._values = normalizer.normalize_values(table.variable_ids, table.values)
        self._static, self._static_mask = normalizer.normalize_static(table.static)
        self._labels = table.labels.astype(np.float32)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def lengths(self) -> np.ndarray:
        """Events per stay after capping (what a batch will hold)."""
        return np.minimum(self.table.lengths, self.max_events)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __getitem__(self, i: int) -> EncodedStay:
        end = int(self.table.offsets[i + 1])
        start = max(int(self.table.offsets[i]), end - self.max_events)
        return EncodedStay(
            times=self.table.times[start:end],
            variables=self.table.variable_ids[start:end],
            values=self._values[start:end],
            static=self._static[i],
            static_mask=self._static_mask[i],
            label=float(self._labels[i]),
        )


def collate_stays(stays: Sequence[EncodedStay]) -> Batch:
    """Pad a list of stays into one Batch; padding goes after each stay's last event."""
    n = len(stays)
    length = max([len(s.times) for s in stays] + [1])
    n_static = stays[0].static.shape[0] if n else 0
    times = np.zeros((n, length), dtype=np.float32)
    variables = np.full((n, length), PADDING_VARIABLE_ID, dtype=np.int64)
    values = np.zeros((n, length), dtype=np.float32)
    mask = np.zeros((n, length), dtype=bool)
    for row, stay in enumerate(stays):
        k = len(stay.times)
        times[row, :k] = stay.times
        variables[row, :k] = stay.variables
        values[row, :k] = stay.values
        mask[row, :k] = True
    return Batch(
        times=torch.from_numpy(times),
        variables=torch.from_numpy(variables),
        values=torch.from_numpy(values),
        mask=torch.from_numpy(mask),
        static=torch.from_numpy(np.stack([s.static for s in stays]).astype(np.float32, copy=False))
        if n
        else torch.zeros((0, n_static)),
        static_mask=torch.from_numpy(np.stack([s.static_mask for s in stays]))
        if n
        else torch.zeros((0, n_static), dtype=torch.bool),
        label=torch.tensor([s.label for s in stays], dtype=torch.float32),
    )


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of stays of similar length, in a random order each epoch.

    Stays are shuffled, cut into windows of ``bucket_factor`` batches, sorted by length
    within each window and cut into batches; the batches are then shuffled. Randomness
    stays while most of the padding goes away.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        bucket_factor: int = 50,
    ):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.bucket_factor = bucket_factor
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.lengths)
        order = self._rng.permutation(n) if self.shuffle else np.arange(n)
        window = self.batch_size * self.bucket_factor
        batches: list[list[int]] = []
        for start in range(0, n, window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in self._rng.permutation(len(batches))]
        return iter(batches)


def make_loader(dataset: StayDataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader of padded, length-bucketed batches (in-process: workers cost more than they save here)."""
    sampler = LengthBucketSampler(dataset.lengths, batch_size, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_stays)
