#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: bash launch/test.sh [pytest args]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/launch/setup.sh"
venv=${HVDCOMP_VENV:-$repo/.venv}
# The second venv with Triton 3.6 (the GPU image's version) for the compile proof of
# tests/test_kernels_compile.py; about a minute cold, a second when it exists.
HVDCOMP_TRITON36_PYTHON=$(bash "$repo/launch/triton36_env.sh")
export HVDCOMP_TRITON36_PYTHON
cd "$repo"
# The multi-rank tests must not be skipped silently where Horovod should be present, nor the
# Triton-3.6 compile proof.
export HVDCOMP_REQUIRE_HOROVOD=1 HVDCOMP_REQUIRE_TRITON36=1 HVDCOMP_REQUIRE_NETNS=1
exec "$venv/bin/python" -m pytest -q "$@"
