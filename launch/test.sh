#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: bash launch/test.sh [pytest args]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/launch/setup.sh"
venv=${HVDCOMP_VENV:-$repo/.venv}
cd "$repo"
# The multi-rank tests must not be skipped silently where Horovod should be present.
export HVDCOMP_REQUIRE_HOROVOD=1
exec "$venv/bin/python" -m pytest -q "$@"
