#!/usr/bin/env bash
# Set up .venv/ with the test extras, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup.sh test
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q "$@"
