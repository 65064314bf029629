"""EHR data in one format: loaders, synthetic data, splits, cache, normalisation.

``load_dataset(name, root)`` is the one entry point the rest of the project uses. Each source
is a module with a loader that reads the dataset's own layout (physionet2012, physionet2019,
eicu, mimic4); adding a source means one module and one entry in ``DATASETS``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cache import cached, fingerprint, load_table, save_table
from .eicu import EICU_STATIC, EICU_VARIABLES, EicuOptions, eicu_sites, load_eicu
from .mimic4 import MIMIC4_STATIC, MIMIC4_VARIABLES, Mimic4Options, load_mimic4, mimic4_sites
from .normalization import MomentSums, Normalizer
from .physionet2012 import (
    ICU_SITES,
    PARSER_VERSION,
    PHYSIONET2012_SETS,
    PHYSIONET2012_STATIC,
    PHYSIONET2012_VARIABLES,
    load_physionet2012,
    load_physionet2012_by_set,
    table_name,
)
from .physionet2019 import (
    PHYSIONET2019_SETS,
    PHYSIONET2019_STATIC,
    PHYSIONET2019_VARIABLES,
    SepsisTask,
    load_physionet2019,
)
from .splits import Split, split_stays
from .stays import (
    PADDING_VARIABLE_ID,
    DataError,
    LoadSummary,
    StayRecord,
    StayTable,
    concat_tables,
    table_from_stays,
)
from .synthetic import (
    SYNTHETIC_STATIC,
    SYNTHETIC_VARIABLES,
    SyntheticConfig,
    make_synthetic,
    site_profiles,
)
from .vocabulary import (
    SHARED_STATIC,
    SHARED_STATIC_NAMES,
    SHARED_VARIABLE_NAMES,
    SHARED_VARIABLES,
    VOCABULARIES,
    VocabularyChoice,
    check_vocabulary,
    to_shared_vocabulary,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_DIR = PROJECT_ROOT / ".cache" / "parsed"
DEFAULT_RAW_DIR = PROJECT_ROOT / ".cache" / "data"


def _synthetic(root: Path | None, cache_dir: Path | None, summary: LoadSummary, **options: Any) -> StayTable:
    """Options are SyntheticConfig fields (or ``config=SyntheticConfig(...)``); no cache."""
    config = options.pop("config", None)
    if config is not None and options:
        raise TypeError(f"pass either config= or SyntheticConfig fields, not both: {options}")
    table = make_synthetic(config or SyntheticConfig(**options))
    summary.stays, summary.events = len(table), table.n_events
    return table


def _physionet2012(
    root: Path | None,
    cache_dir: Path | None,
    summary: LoadSummary,
    sets: tuple[str, ...] = PHYSIONET2012_SETS,
) -> StayTable:
    """Options: ``sets`` (default all three). Cached per choice of sets."""
    root = Path(root) if root is not None else DEFAULT_RAW_DIR / "physionet2012"
    sets = tuple(sets)
    key = f"{table_name(sets)}-v{PARSER_VERSION}"
    if cache_dir is None:
        return load_physionet2012(root, sets, summary)
    return cached(lambda raw, s: load_physionet2012(raw, sets, s), root, cache_dir, key, summary)


def _options_source(folder: str, options_type: type, load: Callable[..., StayTable]) -> Callable[..., StayTable]:
    """A loader for a source whose options are the fields of ``options_type`` (its cache key
    comes from them, so each task or cohort choice is cached apart); raw files default to
    ``.cache/data/<folder>``."""

    def loader(root: Path | None, cache_dir: Path | None, summary: LoadSummary, **options: Any) -> StayTable:
        root = Path(root) if root is not None else DEFAULT_RAW_DIR / folder
        key = options_type(**options).cache_key
        if cache_dir is None:
            return load(root, summary, **options)
        return cached(lambda raw, s: load(raw, s, **options), root, cache_dir, key, summary)

    return loader


# name -> loader(root, cache_dir or None for no cache, summary, **options)
DATASETS: dict[str, Callable[..., StayTable]] = {
    "synthetic": _synthetic,
    "physionet2012": _physionet2012,
    "physionet2019": _options_source("physionet2019", SepsisTask, load_physionet2019),
    "eicu": _options_source("eicu", EicuOptions, load_eicu),
    "mimic4": _options_source("mimic4", Mimic4Options, load_mimic4),
}


def load_dataset(
    name: str,
    root: str | Path | None = None,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    summary: LoadSummary | None = None,
    vocabulary: str = "source",
    **options: Any,
) -> StayTable:
    """Load dataset ``name`` from its raw folder ``root``, through the parquet cache.

    ``root`` None means the project's default location (``.cache/data/<name>``; ignored by
    "synthetic"). ``cache_dir`` None disables the cache. ``options`` go to the source, e.g.
    ``sets=("a",)`` for PhysioNet 2012 or ``n_sites=8`` for synthetic data. ``summary`` is
    filled with what the loader counted. ``vocabulary`` "shared" maps the source's variables,
    units and static features onto the shared clinical vocabulary (``hymate.data.vocabulary``;
    the cache holds the source's own parse, the mapping is redone on each load in well under a
    second). A dataset left with no stay (every record excluded, or empty tables) is a DataError
    naming the folder and what was counted.
    """
    check_vocabulary(name, vocabulary)
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}") from None
    summary = summary if summary is not None else LoadSummary(source=name)
    table = loader(
        Path(root) if root is not None else None,
        Path(cache_dir) if cache_dir is not None else None,
        summary,
        **options,
    )
    if not len(table):
        where = root if root is not None else DEFAULT_RAW_DIR / name
        raise DataError(f"{where}: {name} has no stays left after its exclusions ({summary})")
    return to_shared_vocabulary(table, name) if vocabulary == "shared" else table


__all__ = [
    "DATASETS",
    "DEFAULT_CACHE_DIR",
    "EICU_STATIC",
    "EICU_VARIABLES",
    "ICU_SITES",
    "MIMIC4_STATIC",
    "MIMIC4_VARIABLES",
    "PADDING_VARIABLE_ID",
    "PHYSIONET2012_SETS",
    "PHYSIONET2012_STATIC",
    "PHYSIONET2012_VARIABLES",
    "PHYSIONET2019_SETS",
    "PHYSIONET2019_STATIC",
    "PHYSIONET2019_VARIABLES",
    "SHARED_STATIC",
    "SHARED_STATIC_NAMES",
    "SHARED_VARIABLES",
    "SHARED_VARIABLE_NAMES",
    "SYNTHETIC_STATIC",
    "SYNTHETIC_VARIABLES",
    "DataError",
    "EicuOptions",
    "LoadSummary",
    "Mimic4Options",
    "MomentSums",
    "Normalizer",
    "SepsisTask",
    "Split",
    "StayRecord",
    "StayTable",
    "VOCABULARIES",
    "VocabularyChoice",
    "SyntheticConfig",
    "cached",
    "concat_tables",
    "eicu_sites",
    "fingerprint",
    "check_vocabulary",
    "load_dataset",
    "load_eicu",
    "load_mimic4",
    "load_physionet2012",
    "load_physionet2012_by_set",
    "load_physionet2019",
    "load_table",
    "make_synthetic",
    "mimic4_sites",
    "save_table",
    "site_profiles",
    "split_stays",
    "table_from_stays",
    "to_shared_vocabulary",
]
