#!/usr/bin/env bash
# Create .venv (once) and install HyMaTE-FL into it. Idempotent: a second run only
# re-installs the project itself. torch==2.13.0 goes first: on these machines that pin is
# a CPU build already on disk, while an unpinned torch would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=${1:-}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install --quiet torch==2.13.0
fi
.venv/bin/pip install --quiet -e ".${extras:+[$extras]}"
.venv/bin/python -c "import hymate, torch; print(f'hymate-fl ready (torch {torch.__version__})')"
