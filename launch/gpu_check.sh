#!/usr/bin/env bash
# The first GPU hour in one command (see launch/gpu_check.py and docs/kernels.md, "GPU check"):
#
#   bash launch/gpu_check.sh          # one H100/H200: kernel tests on CUDA, kernel bench,
#                                     # compress-vs-backward (ResNet-50, GPT-2-medium); < 8 min
#   bash launch/gpu_check.sh --dry    # the same steps on CPU with tiny sizes (CI)
#   ... --out DIR                     # where the JSON records go (default results/gpu_check)
#
# Installs nothing from the internet. The interpreter is, in order: $HVDCOMP_GPU_PYTHON;
# the project's .venv when it has CUDA (or for --dry); python3 if it imports hvdcomp.kernels;
# else python3 with this checkout made importable through .venv-gpu, a venv that sees
# python3's packages (--system-site-packages: the GPU image's torch, Triton) and holds only
# hvdcomp, installed editable from here with --no-index.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
die() { echo "gpu_check: $*" >&2; exit 2; }

dry=0
for a in "$@"; do [ "$a" = --dry ] && dry=1; done

imports() { "$1" -c "import hvdcomp.kernels" >/dev/null 2>&1; }
has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }

py=${HVDCOMP_GPU_PYTHON:-}
if [ -z "$py" ] && [ -x "$repo/.venv/bin/python" ] && imports "$repo/.venv/bin/python" \
   && { [ "$dry" = 1 ] || has_cuda "$repo/.venv/bin/python"; }; then
  py=$repo/.venv/bin/python
fi
if [ -z "$py" ]; then
  base=${PYTHON:-python3}
  command -v "$base" >/dev/null 2>&1 || die "no $base on PATH (set PYTHON or HVDCOMP_GPU_PYTHON)"
  "$base" -c "import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)" \
    || die "$("$base" -V 2>&1) is too old: hvdcomp needs Python >= 3.10 (the GPU image has 3.12)"
  "$base" -c "import torch" 2>/dev/null || die "$base cannot import torch: use the GPU image or set HVDCOMP_GPU_PYTHON"
  if imports "$base"; then
    py=$(command -v "$base")
  else
    venv=$repo/.venv-gpu
    if ! imports "$venv/bin/python" 2>/dev/null; then
      echo "[gpu_check] making this checkout importable: $venv (system site packages + hvdcomp editable)" >&2
      "$base" -m venv --system-site-packages "$venv" || die "cannot create $venv"
      "$venv/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e "$repo" \
        || die "pip could not install this checkout offline (needs setuptools >= 64 in $base's packages)"
    fi
    py=$venv/bin/python
  fi
fi
imports "$py" || die "$py cannot import hvdcomp.kernels"
exec "$py" -m launch.gpu_check "$@"
