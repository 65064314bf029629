"""The common stay format every EHR source is turned into (DESIGN.md section 2).

A dataset is a :class:`StayTable`: one row per ICU stay (id, patient, site, label, static
features) plus all of the stays' events stored flat and sorted by time within each stay, with
``offsets`` marking where each stay's events begin. Flat arrays keep 12,000 stays with five
million events in a few numpy arrays instead of 12,000 small frames, so subsetting, caching
and batching stay cheap.

Variable ids are 1-based: id ``k`` is ``variables[k - 1]`` and id 0 is reserved for padding.
Values are as measured; normalisation happens later (``hymate.data.normalization``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

PADDING_VARIABLE_ID = 0


class DataError(ValueError):
    """Input data is malformed; the message names the file, column or record at fault."""


@dataclass
class LoadSummary:
    """What a loader did with odd but valid input, so nothing is dropped silently."""

    source: str
    stays: int = 0
    events: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def __str__(self) -> str:
        extra = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        return f"{self.source}: {self.stays} stays, {self.events} events" + (f" ({extra})" if extra else "")


@dataclass(frozen=True)
class StayTable:
    """ICU stays of one source in the common format.

    Per stay (length N): ``stay_ids``, ``patient_ids`` (splits are patient-level),
    ``sites`` (hospital or unit), ``labels`` (0/1), ``static`` (N, S) float32 with NaN for
    missing. Per event (length E), time-sorted within each stay: ``times`` (hours since
    admission), ``variable_ids`` (1-based), ``values``. ``offsets`` (N + 1) delimits the stays.
    """

    name: str
    variables: tuple[str, ...]
    static_names: tuple[str, ...]
    stay_ids: np.ndarray
    patient_ids: np.ndarray
    sites: np.ndarray
    labels: np.ndarray
    static: np.ndarray
    offsets: np.ndarray
    times: np.ndarray
    variable_ids: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        self.validate()

    def __len__(self) -> int:
        return len(self.stay_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Number of events of each stay."""
        return np.diff(self.offsets)

    @property
    def n_events(self) -> int:
        return int(self.offsets[-1])

    def events(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(times, variable_ids, values) of stay ``i``."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.times[a:b], self.variable_ids[a:b], self.values[a:b]

    def site_names(self) -> list[str]:
        """Distinct sites in a stable (sorted) order."""
        return sorted({str(s) for s in self.sites})

    def subset(self, index: Sequence[int] | np.ndarray) -> StayTable:
        """The stays at ``index`` (in that order), events included."""
        index = np.asarray(index, dtype=np.int64)
        starts, ends = self.offsets[index], self.offsets[index + 1]
        lengths = ends - starts
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        event_index = (
            np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)])
            if len(index)
            else np.zeros(0, dtype=np.int64)
        )
        return StayTable(
            name=self.name,
            variables=self.variables,
            static_names=self.static_names,
            stay_ids=self.stay_ids[index],
            patient_ids=self.patient_ids[index],
            sites=self.sites[index],
            labels=self.labels[index],
            static=self.static[index],
            offsets=offsets,
            times=self.times[event_index],
            variable_ids=self.variable_ids[event_index],
            values=self.values[event_index],
        )

    def where_site(self, *sites: str) -> StayTable:
        """The stays of the given sites."""
        return self.subset(np.flatnonzero(np.isin(self.sites.astype(str), list(sites))))

    def validate(self) -> None:
        """Check the invariants consumers rely on; raise DataError naming the first broken one."""
        n = len(self.stay_ids)
        for name in ("patient_ids", "sites", "labels"):
            if len(getattr(self, name)) != n:
                raise DataError(f"{self.name}: {name} has {len(getattr(self, name))} rows, expected {n}")
        if self.static.shape != (n, len(self.static_names)):
            raise DataError(
                f"{self.name}: static has shape {self.static.shape}, expected {(n, len(self.static_names))}"
            )
        offsets = self.offsets
        if offsets.shape != (n + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise DataError(f"{self.name}: offsets must be non-decreasing, start at 0, length N + 1")
        e = int(self.offsets[-1])
        for name in ("times", "variable_ids", "values"):
            if len(getattr(self, name)) != e:
                raise DataError(f"{self.name}: {name} has {len(getattr(self, name))} events, expected {e}")
        if not np.isin(self.labels, (0, 1)).all():
            bad = self.stay_ids[~np.isin(self.labels, (0, 1))][:3]
            raise DataError(f"{self.name}: labels must be 0 or 1 (stays {list(bad)} are not)")
        if e and (self.variable_ids.min() < 1 or self.variable_ids.max() > len(self.variables)):
            raise DataError(f"{self.name}: variable ids must lie in 1..{len(self.variables)}")
        if not np.isfinite(self.times).all() or not np.isfinite(self.values).all():
            raise DataError(f"{self.name}: event times and values must be finite")


def concat_tables(tables: Sequence[StayTable], name: str | None = None) -> StayTable:
    """Stack tables that share one variable vocabulary and static schema."""
    if not tables:
        raise DataError(f"no tables to concatenate{f' into {name}' if name else ''}")
    first = tables[0]
    for t in tables[1:]:
        if t.variables != first.variables or t.static_names != first.static_names:
            raise DataError(f"cannot concatenate {t.name} with {first.name}: different schemas")
    lengths = np.concatenate([t.lengths for t in tables])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return StayTable(
        name=name or first.name,
        variables=first.variables,
        static_names=first.static_names,
        stay_ids=np.concatenate([t.stay_ids for t in tables]),
        patient_ids=np.concatenate([t.patient_ids for t in tables]),
        sites=np.concatenate([t.sites for t in tables]),
        labels=np.concatenate([t.labels for t in tables]),
        static=np.concatenate([t.static for t in tables]),
        offsets=offsets,
        times=np.concatenate([t.times for t in tables]),
        variable_ids=np.concatenate([t.variable_ids for t in tables]),
        values=np.concatenate([t.values for t in tables]),
    )


def table_from_stays(
    name: str,
    variables: Sequence[str],
    static_names: Sequence[str],
    stays: Sequence[StayRecord],
) -> StayTable:
    """Build a table from per-stay records (what loaders produce while parsing)."""
    lengths = np.array([len(s.times) for s in stays], dtype=np.int64)
    offsets = np.zeros(len(stays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    def flat(attr: str, dtype: type) -> np.ndarray:
        parts = [np.asarray(getattr(s, attr), dtype=dtype) for s in stays]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    times, variable_ids, values = (
        flat("times", np.float32),
        flat("variable_ids", np.int32),
        flat("values", np.float32),
    )
    # Sort each stay's events by time (stable, so simultaneous events keep file order).
    stay_of_event = np.repeat(np.arange(len(stays)), lengths)
    order = np.lexsort((times, stay_of_event))
    static = np.array([s.static for s in stays], dtype=np.float32).reshape(len(stays), len(static_names))
    return StayTable(
        name=name,
        variables=tuple(variables),
        static_names=tuple(static_names),
        stay_ids=np.array([str(s.stay_id) for s in stays], dtype=object),
        patient_ids=np.array([str(s.patient_id) for s in stays], dtype=object),
        sites=np.array([str(s.site) for s in stays], dtype=object),
        labels=np.array([s.label for s in stays], dtype=np.int8),
        static=static,
        offsets=offsets,
        times=times[order],
        variable_ids=variable_ids[order],
        values=values[order],
    )


@dataclass
class StayRecord:
    """One stay while a loader builds it; ``table_from_stays`` packs many into a StayTable."""

    stay_id: str
    patient_id: str
    site: str
    label: int
    static: Sequence[float]
    times: Sequence[float]
    variable_ids: Sequence[int]
    values: Sequence[float]
