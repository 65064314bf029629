"""Shared fixtures. The real data is optional: tests that need it skip cleanly without it."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
P12_ARCHIVE = REPO.parent / "shared/data/physionet2012.tar.gz"
P12_UNPACKED = REPO / ".cache/data/physionet2012"


def _unpack_p12() -> Path | None:
    """Unpack the PhysioNet 2012 archive into <repo>/.cache/data once (atomically)."""
    if (P12_UNPACKED / "Outcomes-c.txt").is_file():
        return P12_UNPACKED
    if not P12_ARCHIVE.is_file():
        return None
    P12_UNPACKED.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=P12_UNPACKED.parent))
    try:
        with tarfile.open(P12_ARCHIVE) as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(tmp, filter="data")
            else:  # Python < 3.10.12 has no extraction filters
                archive.extractall(tmp)  # noqa: S202 - our own archive
        if not P12_UNPACKED.exists():
            os.replace(tmp / "physionet2012", P12_UNPACKED)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return P12_UNPACKED


@pytest.fixture(scope="session")
def p12_root() -> Path:
    """The raw PhysioNet 2012 folder: $HYMATE_P12_DIR, else the unpacked shared archive."""
    env = os.environ.get("HYMATE_P12_DIR")
    if env:
        if not Path(env).is_dir():
            pytest.skip(f"HYMATE_P12_DIR={env} is not a folder")
        return Path(env)
    root = _unpack_p12()
    if root is None:
        pytest.skip(f"PhysioNet 2012 archive not found at {P12_ARCHIVE}")
    return root


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


@pytest.fixture(scope="session")
def p19_root() -> Path:
    """The raw PhysioNet 2019 folder: $HYMATE_P19_DIR, else the unpacked shared archive."""
    env = os.environ.get("HYMATE_P19_DIR")
    if env:
        if not Path(env).is_dir():
            pytest.skip(f"HYMATE_P19_DIR={env} is not a folder")
        return Path(env)
    root = _unpack_archive(P19_ARCHIVE, P19_UNPACKED)
    if root is None:
        pytest.skip(f"PhysioNet 2019 archive not found at {P19_ARCHIVE}")
    return root
