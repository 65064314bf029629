#!/usr/bin/env bash
# Set up (scripts/setup.sh with the test extras) and run the whole test suite.
# pytest's exit code 5 ("no tests collected") is a failure here: a suite that ran nothing
# must never look green.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh test || exit 1
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
exit "$status"
