#!/usr/bin/env bash
# A second, small venv with Triton 3.6 (the GPU image's version) beside the project's
# Triton-3.9 venv, so that CI proves every kernel compiles on both (tests/test_kernels_compile.py).
#
#   bash launch/triton36_env.sh     # prints the venv's python on stdout
#
# Holds only what the compile proof needs: torch (the same CPU build as .venv), numpy,
# setuptools, triton==3.6.0 and hvdcomp itself (editable). Idempotent: a second run
# installs nothing (about 1 s); a cold run takes about a minute (torch's CPU wheel).
#   HVDCOMP_TRITON36_VENV  where it lives (default: <repo>/.venv-triton36)
#   PYTHON                 the interpreter that creates it (default: python3)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${HVDCOMP_TRITON36_VENV:-$repo/.venv-triton36}
triton_version=3.6.0
torch_cpu_version=2.13.0
pins=$(grep -E '^(numpy|setuptools)==' "$repo/launch/requirements.txt")

log() { echo "[triton36_env] $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating venv at $venv (Triton $triton_version)"
  "${PYTHON:-python3}" -m venv "$venv"
fi
py=$venv/bin/python
pip=("$py" -m pip --disable-pip-version-check -q)

stamp=$venv/.hvdcomp-triton36
want=$( (echo "$triton_version $torch_cpu_version $pins"; cat "$repo/pyproject.toml") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if ! "$py" -c "import torch" 2>/dev/null; then
    log "installing torch==$torch_cpu_version"
    "${pip[@]}" install "torch==$torch_cpu_version"
  fi
  log "installing triton==$triton_version, $(echo "$pins" | tr '\n' ' ')and hvdcomp (editable)"
  # shellcheck disable=SC2086
  "${pip[@]}" install "triton==$triton_version" $pins
  "${pip[@]}" install --no-deps --no-build-isolation -e "$repo"
  echo "$want" > "$stamp"
fi
"$py" -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__"
echo "$py"
