#!/usr/bin/env bash
# The whole test suite: sets up (idempotent), then unit and end-to-end tests with
# the real dockerd, runc and QEMU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
exec .venv/bin/python -m pytest -v --durations=15 tests/unit tests/e2e "$@"
