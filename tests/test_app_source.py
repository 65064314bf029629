"""The staged Flower App builds the FAB that ``flwr run`` would build from the project itself."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk, build_fab_from_files

from server.app_source import PROJECT_DIR, AppSourceError, staged_app

# Ignored by .gitignore, and the bulk of the walk that staging avoids.
HEAVY_DIRS = {".venv", ".cache", "runs", ".git"}


def project_files() -> dict[str, Path]:
    """What Flower's own walk collects from the project, less the ignored heavy directories."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(PROJECT_DIR):
        dirnames[:] = [d for d in dirnames if d not in HEAVY_DIRS]
        for name in filenames:
            path = Path(dirpath) / name
            files[path.relative_to(PROJECT_DIR).as_posix()] = path
    return files


def test_the_staged_app_builds_the_projects_fab_byte_for_byte():
    expected = build_fab_from_files(project_files())[0]
    with staged_app() as app:
        staged = build_fab_from_disk(app)
    assert hashlib.sha256(staged).hexdigest() == hashlib.sha256(expected).hexdigest()
    names = zipfile.ZipFile(io.BytesIO(staged)).namelist()
    assert "server/app.py" in names and "strategies/registry.py" in names
    # The coordinator's side only: a site never receives its own code in a FAB (client/runner.py).
    assert not [n for n in names if n.startswith(("client/", "hymate/", "simulation/"))]


def test_a_project_without_fab_include_is_named(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    missing = r"pyproject.toml: \[tool.flwr.app\] fab-include is missing"
    with pytest.raises(AppSourceError, match=missing), staged_app(tmp_path):
        pass


def test_a_missing_pyproject_says_where_the_app_comes_from(tmp_path):
    with pytest.raises(AppSourceError, match="not readable.*installed from"), staged_app(tmp_path):
        pass


def test_a_corrupt_pyproject_is_named(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.flwr.app\n")
    with pytest.raises(AppSourceError, match="pyproject.toml: not valid TOML"), staged_app(tmp_path):
        pass
