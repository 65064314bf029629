"""Relational CSV exports (eICU-CRD, MIMIC-IV): find a table, check it, read it in bounded chunks.

Both databases ship as many CSV tables (``name.csv`` or ``name.csv.gz``) joined on ids, and
their event tables are far larger than memory (MIMIC-IV ``chartevents`` holds over 300
million rows). Their loaders share three needs, met here once:

- :func:`find_table` / :func:`find_tables`: the file of a table, ``.csv`` or ``.csv.gz``
  (file names compared case-insensitively, since copies differ: ``vitalPeriodic.csv.gz`` vs
  ``vitalperiodic.csv``), or one DataError naming every table that is missing.
- :func:`read_table` / :func:`iter_chunks`: only the needed columns, with declared kinds
  (integer, number, text), in chunks of ``chunk_rows`` rows so memory stays bounded;
  a missing column raises a DataError naming the file and the column, a malformed value (or
  a number beyond float32, the type events are stored in) one naming the file, line and
  column (found by a slow second pass, only on failure), and a truncated or corrupt
  compressed file one naming the file and the line the reader had reached. A header-only
  table is warned about and counted in the LoadSummary (``empty_table_<name>``).
- :func:`pack_events`: long-format events (stay index, time, variable id, value) into a
  :class:`StayTable`, time-sorted within each stay.

Line numbers assume one line per row (true of both databases' exports): row ``i`` (0-based)
of a table is line ``i + 2`` of its file. Frames keep the reader's index, which is that row
number (pandas continues it across chunks).
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .stays import DataError, LoadSummary, StayTable

logger = logging.getLogger(__name__)

Kind = Literal["integer", "number", "text"]
_PANDAS_DTYPE: dict[str, object] = {"integer": "int64", "number": "float64", "text": object}
_INTEGER = re.compile(r"\s*[-+]?\d+\s*")
MISSING = ["", "NaN", "nan", "NULL"]  # how exports write a missing cell (real ones: empty)
DEFAULT_CHUNK_ROWS = 1_000_000
_PROGRESS_ROWS = 10_000_000  # log progress through the big tables every this many rows
FLOAT32_MAX = float(np.finfo(np.float32).max)  # events and statics are stored as float32
# What a truncated or corrupt .csv.gz raises while it is read (gzip.BadGzipFile is an OSError).
_BROKEN_FILE = (EOFError, OSError, zlib.error)


def find_table(folder: Path, name: str) -> Path:
    """``folder/name.csv`` or ``folder/name.csv.gz`` (exact name first, then any letter case)."""
    for suffix in (".csv", ".csv.gz"):
        if (folder / (name + suffix)).is_file():
            return folder / (name + suffix)
    wanted = {(name + suffix).lower() for suffix in (".csv", ".csv.gz")}
    if folder.is_dir():
        matches = sorted(p for p in folder.iterdir() if p.name.lower() in wanted and p.is_file())
        if matches:
            return matches[0]
    raise DataError(f"{folder / name}.csv(.gz): table file not found")


def find_tables(wanted: Sequence[tuple[Path, str]]) -> list[Path]:
    """:func:`find_table` for each (folder, name), with every missing table named in one error."""
    found, missing = [], []
    for folder, name in wanted:
        try:
            found.append(find_table(folder, name))
        except DataError as exc:
            missing.append(str(exc))
    if missing:
        raise DataError("; ".join(missing))
    return found


def header(path: Path) -> list[str]:
    """The column names of a CSV table."""
    try:
        return list(pd.read_csv(path, nrows=0).columns)
    except (OSError, ValueError, EOFError) as exc:  # unreadable, not gzip, empty
        raise DataError(f"{path}: cannot read the header ({type(exc).__name__}: {exc})") from exc


def require_columns(path: Path, columns: Sequence[str]) -> None:
    """Raise a DataError naming the file and every missing column."""
    found = header(path)
    missing = [c for c in columns if c not in found]
    if missing:
        raise DataError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(found: {', '.join(found[:30])}{', ...' if len(found) > 30 else ''})"
        )


def _locate_bad_value(path: Path, kinds: Mapping[str, Kind], chunk_rows: int) -> DataError | None:
    """Re-read ``path`` as text and name the first id/number cell that does not parse."""
    checked = [c for c, k in kinds.items() if k != "text"]
    line = 2
    reader = pd.read_csv(
        path, usecols=checked, dtype=object, keep_default_na=False, na_values=MISSING, chunksize=chunk_rows
    )
    for chunk in reader:
        for column in checked:
            values = chunk[column]
            if kinds[column] == "integer":
                ok = values.map(lambda v: isinstance(v, str) and bool(_INTEGER.fullmatch(v)))
            else:
                numbers = pd.to_numeric(values, errors="coerce")
                ok = values.isna() | (numbers.notna() & (numbers.abs().fillna(0.0) <= FLOAT32_MAX))
            bad = np.flatnonzero(~ok.to_numpy(dtype=bool))
            if len(bad):
                i = int(bad[0])
                text = values.iloc[i]
                what = "is missing" if not isinstance(text, str) else f"{text!r} is not an integer"
                if kinds[column] == "number":
                    what = f"{text!r} is not a finite number within the float32 range (|x| <= {FLOAT32_MAX:.3g})"
                return DataError(f"{path}:{line + i}: column {column} value {what}")
        line += len(chunk)
    return None


def iter_chunks(
    path: Path,
    kinds: Mapping[str, Kind],
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    summary: LoadSummary | None = None,
) -> Iterator[pd.DataFrame]:
    """The ``kinds`` columns of ``path`` in chunks: integers int64, numbers float64, text object.

    Empty cells (or ``NaN``, ``NULL``) are NaN in numbers and text; an empty or malformed
    integer (ids, offsets), or a number cell that is not a finite number within the float32
    range, raises a DataError naming file, line and column; a truncated or corrupt file one
    naming the file. A table without rows is warned about and counted in ``summary``.
    """
    require_columns(path, list(kinds))
    reader = pd.read_csv(
        path,
        usecols=list(kinds),
        dtype={c: _PANDAS_DTYPE[k] for c, k in kinds.items()},
        keep_default_na=False,
        na_values=MISSING,
        chunksize=chunk_rows,
    )
    numbers = [c for c, k in kinds.items() if k == "number"]
    rows = 0
    with reader:
        while True:
            try:
                chunk = next(reader)
            except StopIteration:
                logger.info("%s: read %d rows", path, rows)
                if not rows:
                    logger.warning("%s: the table has a header but no rows", path)
                    if summary is not None:
                        summary.count(f"empty_table_{_table_stem(path)}")
                return
            except _BROKEN_FILE as exc:
                raise DataError(
                    f"{path}: truncated or corrupt file, unreadable after line {rows + 1} ({type(exc).__name__}: {exc})"
                ) from exc
            except (ValueError, TypeError, OverflowError) as exc:
                located = _locate_bad_value(path, kinds, chunk_rows)
                raise located or DataError(f"{path}: unparseable values ({exc})") from exc
            if numbers and (np.abs(chunk[numbers].to_numpy(dtype=float)) > FLOAT32_MAX).any():
                raise _locate_bad_value(path, kinds, chunk_rows) or DataError(f"{path}: values beyond float32")
            rows += len(chunk)
            if rows // _PROGRESS_ROWS > (rows - len(chunk)) // _PROGRESS_ROWS:
                logger.info("%s: %d rows so far", path, rows)
            yield chunk


def _table_stem(path: Path) -> str:
    """'vitalPeriodic' for vitalPeriodic.csv.gz."""
    return path.name.split(".")[0]


def read_table(
    path: Path,
    kinds: Mapping[str, Kind],
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    summary: LoadSummary | None = None,
) -> pd.DataFrame:
    """The whole table (for the small ones: patients, stays, admissions)."""
    chunks = list(iter_chunks(path, kinds, chunk_rows, summary))
    if not chunks:
        return pd.DataFrame({c: pd.Series(dtype=_PANDAS_DTYPE[k]) for c, k in kinds.items()})
    return pd.concat(chunks, ignore_index=True)


def parse_times(path: Path, column: str, values: pd.Series) -> pd.Series:
    """'YYYY-MM-DD HH:MM:SS' text -> datetime64; a malformed or missing one raises a DataError.

    ``values`` keeps the index the reader gave it (the row number in the file, also across
    chunks), so the error names the right line even after rows were filtered out.
    """
    times = pd.to_datetime(values, format="%Y-%m-%d %H:%M:%S", errors="coerce")
    bad = np.flatnonzero(times.isna().to_numpy())
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{path}:{values.index[i] + 2}: column {column} value {values.iloc[i]!r} "
            "is not a time 'YYYY-MM-DD HH:MM:SS'"
        )
    return times


def pack_events(
    name: str,
    variables: Sequence[str],
    static_names: Sequence[str],
    stay_ids: Sequence[str],
    patient_ids: Sequence[str],
    sites: Sequence[str],
    labels: np.ndarray,
    static: np.ndarray,
    stay_index: np.ndarray,
    times: np.ndarray,
    variable_ids: np.ndarray,
    values: np.ndarray,
) -> StayTable:
    """A StayTable from per-stay arrays and long events (``stay_index`` into the stays).

    Events are sorted by stay, time, then variable id, so the order does not depend on the
    order of rows in the raw files or of chunks.
    """
    n = len(stay_ids)
    stay_index = np.asarray(stay_index, dtype=np.int64)
    times = np.asarray(times, dtype=np.float32)
    variable_ids = np.asarray(variable_ids, dtype=np.int32)
    values = np.asarray(values, dtype=np.float32)
    order = np.lexsort((variable_ids, times, stay_index))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(stay_index, minlength=n), out=offsets[1:])
    return StayTable(
        name=name,
        variables=tuple(variables),
        static_names=tuple(static_names),
        stay_ids=np.array([str(s) for s in stay_ids], dtype=object),
        patient_ids=np.array([str(p) for p in patient_ids], dtype=object),
        sites=np.array([str(s) for s in sites], dtype=object),
        labels=np.asarray(labels, dtype=np.int8),
        static=np.asarray(static, dtype=np.float32).reshape(n, len(static_names)),
        offsets=offsets,
        times=times[order],
        variable_ids=variable_ids[order],
        values=values[order],
    )


def check_sites(requested: Sequence[str] | None, present: Sequence[str], what: str, path: Path) -> None:
    """Raise a DataError naming requested sites that ``path`` does not hold, listing the valid ones.

    ``present`` is listed in the order given (callers sort it the natural way for their ids).
    """
    if requested is None:
        return
    unknown = [s for s in requested if s not in set(present)]
    if unknown:
        shown = ", ".join(list(present)[:40]) + (f", ... ({len(present)} in all)" if len(present) > 40 else "")
        raise DataError(f"{path}: unknown {what} {', '.join(map(repr, unknown))}; valid: {shown}")
