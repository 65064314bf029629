"""Shared fixtures. The real data is optional: tests that need it skip cleanly without it."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

# The suite's processes share the cores: two pytest-xdist workers (scripts/test.sh), and the sites
# of a deployment test. OpenMP threads that busy-wait for work would starve the others (a site's
# training step measured 5x slower; the whole suite in two workers 740 s and 20.6 CPU-min against
# 607 s and 15.5 CPU-min; one process 788 s), so they sleep instead. Set before torch loads OpenMP;
# every process a test starts inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
P12_ARCHIVE = REPO.parent / "shared/data/physionet2012.tar.gz"
P12_UNPACKED = REPO / ".cache/data/physionet2012"
P19_ARCHIVE = REPO.parent / "shared/data/physionet2019.tar.gz"
P19_UNPACKED = REPO / ".cache/data/physionet2019"


def _unpack_archive(archive: Path, unpacked: Path) -> Path | None:
    """Unpack ``archive`` (holding one top folder named like ``unpacked``) once, atomically.

    The folder is renamed into place only when complete, so its existence means it is whole.
    """
    if unpacked.is_dir():
        return unpacked
    if not archive.is_file():
        return None
    unpacked.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=unpacked.parent))
    try:
        with tarfile.open(archive) as opened:
            if hasattr(tarfile, "data_filter"):
                opened.extractall(tmp, filter="data")
            else:  # Python < 3.10.12 has no extraction filters
                opened.extractall(tmp)  # noqa: S202 - our own archive
        if not unpacked.exists():
            os.replace(tmp / unpacked.name, unpacked)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return unpacked


def _raw_root(variable: str, archive: Path, unpacked: Path, name: str) -> Path:
    """The raw folder from ``$variable``, else ``archive`` unpacked; skips cleanly without either."""
    env = os.environ.get(variable)
    if env:
        if not Path(env).is_dir():
            pytest.skip(f"{variable}={env} is not a folder")
        return Path(env)
    root = _unpack_archive(archive, unpacked)
    if root is None:
        pytest.skip(f"{name} archive not found at {archive}")
    return root


@pytest.fixture(scope="session")
def p12_root() -> Path:
    """The raw PhysioNet 2012 folder: $HYMATE_P12_DIR, else the unpacked shared archive."""
    return _raw_root("HYMATE_P12_DIR", P12_ARCHIVE, P12_UNPACKED, "PhysioNet 2012")


@pytest.fixture(scope="session")
def p19_root() -> Path:
    """The raw PhysioNet 2019 folder: $HYMATE_P19_DIR, else the unpacked shared archive."""
    return _raw_root("HYMATE_P19_DIR", P19_ARCHIVE, P19_UNPACKED, "PhysioNet 2019")
