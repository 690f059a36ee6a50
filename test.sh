#!/usr/bin/env bash
# The whole test suite: sets up (idempotent), then unit and end-to-end tests with
# the real dockerd, runc and QEMU. Extra arguments go to pytest.
#
# ./test.sh --fast: the developer's loop. It leaves out the tests marked slow
# (pytest.ini), and instead of the whole set-up it only rebuilds and reinstalls
# dist/dkvm.pyz when a source is newer than it (the full set-up still runs when
# the venv or dockerd is missing). Each run writes build/test-durations.txt.
set -euo pipefail
cd "$(dirname "$0")"

tier=()
if [ "${1:-}" = "--fast" ]; then
  shift
  tier=(-m "not slow")
  if [ ! -x .venv/bin/python ] || ! docker info >/dev/null 2>&1; then
    ./setup.sh
  elif [ ! -f dist/dkvm.pyz ] \
      || [ -n "$(find dkvm guest-init kernels build.py requirements-dev.txt -newer dist/dkvm.pyz \
                 -not -name '*.pyc' -not -path '*/__pycache__*' -print -quit)" ] \
      || ! cmp -s dist/dkvm.pyz /usr/local/bin/dkvm.pyz; then
    echo "test: rebuilding dist/dkvm.pyz"
    .venv/bin/python build.py
    /usr/bin/python3 dist/dkvm.pyz install
  fi
else
  ./setup.sh
fi
exec .venv/bin/python -m pytest -v --durations=15 "${tier[@]}" tests/unit tests/e2e "$@"
