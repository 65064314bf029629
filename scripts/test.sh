#!/usr/bin/env bash
# Set up (scripts/setup.sh with the test extras) and run the whole test suite.
# pytest's exit code 5 ("no tests collected") is a failure here: a suite that ran nothing
# must never look green.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh test || exit 1
.venv/bin/python -m pytest --durations=15 "$@"  # the slowest tests, to keep the suite inside 15 minutes
status=$?
if [ "$status" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
