"""The coordinator's Flower App as ``flwr run`` gets it: a copy of pyproject.toml and of the
files its ``fab-include`` names, in a directory of their own.

Why a copy: ``flwr run DIR`` (Flower 1.42, ``flwr.cli.utils.collect_files``) walks and resolves
every file under DIR before it applies the include patterns. Run on the project itself, that walk
goes through the virtual environment, the data cache and runs/: 14 of the 16 s of a ``flwr
build`` measured on this project's checkout, and the same again at every hymate-server and
hymate-sim start. The FAB built from the copy holds the same files, so it has the same hash.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]


class AppSourceError(RuntimeError):
    """The project's Flower App could not be staged; names the file that is missing or wrong."""


def fab_include_patterns(pyproject: Path) -> list[str]:
    try:
        text = pyproject.read_text()
    except OSError as e:
        raise AppSourceError(
            f"{pyproject}: not readable ({e}); hymate-server and hymate-sim run the Flower App of the "
            "project they were installed from (pip install -e)"
        ) from None
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AppSourceError(f"{pyproject}: not valid TOML ({e})") from None
    patterns = config.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    if not patterns:
        raise AppSourceError(f"{pyproject}: [tool.flwr.app] fab-include is missing")
    return list(patterns)


@contextlib.contextmanager
def staged_app(project_dir: Path = PROJECT_DIR) -> Iterator[Path]:
    """A temporary directory holding the app's pyproject.toml and its ``fab-include`` files."""
    pyproject = project_dir / "pyproject.toml"
    patterns = fab_include_patterns(pyproject)
    with tempfile.TemporaryDirectory(prefix="hymate-app-") as tmp:
        staged = Path(tmp)
        shutil.copyfile(pyproject, staged / "pyproject.toml")
        for pattern in patterns:
            for source in project_dir.glob(pattern):
                if source.is_file() and "__pycache__" not in source.parts:
                    target = staged / source.relative_to(project_dir)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, target)
        yield staged
