#!/usr/bin/env bash
# Set up (scripts/setup.sh with the test extras), lint, and run the whole test suite.
# pytest's exit code 5 ("no tests collected") is a failure here: a suite that ran nothing
# must never look green.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh test || exit 1
# ruff (pyproject's [tool.ruff]) before the tests, about a second: an unformatted file or an unused
# import fails CI here instead of surviving until someone runs ruff by hand. The tests run either way.
lint=0
.venv/bin/ruff check --quiet . || lint=1
.venv/bin/ruff format --check --quiet . || lint=1
# Two pytest-xdist workers, one per core of a CI machine: the tests that start federations or Ray
# clusters run one at a time in their groups (tests/deployment.py), the unit tests beside them.
# `-n 0` after the command runs everything in one process. --durations: the slowest tests, to keep
# the suite inside 15 minutes.
.venv/bin/python -m pytest -n 2 --dist loadgroup --durations=15 "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests" >&2
    exit 1
fi
if [ "$lint" -ne 0 ]; then
    echo "scripts/test.sh: ruff found problems (above); \`.venv/bin/ruff check --fix . && .venv/bin/ruff format .\` mends most" >&2
    [ "$status" -eq 0 ] && status=1
fi
exit "$status"
