#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs everything hvdcomp,
# its tests, launchers and benchmarks need, Horovod 0.28.1 included.
#
#   bash launch/setup.sh            # then: source .venv/bin/activate
#
# Idempotent and cached: a second run installs nothing and never rebuilds Horovod.
#   HVDCOMP_VENV    where the venv lives (default: <repo>/.venv)
#   HVDCOMP_CACHE   where the built Horovod wheel is kept for other venvs and clones
#                   (default: ~/.cache/hvdcomp)
#   PYTHON          the interpreter that creates the venv (default: python3)
#   HVDCOMP_WITH_MPI  auto (default): Horovod with MPI and mpi4py where OpenMPI's mpicxx is
#                   present; 1: install Debian's OpenMPI first if missing (needs root and
#                   apt-get); 0: Gloo only
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${HVDCOMP_VENV:-$repo/.venv}
cache=${HVDCOMP_CACHE:-$HOME/.cache/hvdcomp}
horovod_version=0.28.1
torch_cpu_version=2.13.0
mpi4py_version=4.1.2

log() { echo "[setup] $*" >&2; }

with_mpi=${HVDCOMP_WITH_MPI:-auto}
if [ "$with_mpi" = 1 ] && ! command -v mpicxx >/dev/null 2>&1; then
  log "installing Debian's OpenMPI (libopenmpi-dev, openmpi-bin)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null
fi
if [ "$with_mpi" != 0 ] && command -v mpicxx >/dev/null 2>&1; then mpi=mpi; else mpi=nompi; fi

if [ ! -x "$venv/bin/python" ]; then
  log "creating venv at $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
py=$venv/bin/python
pip=("$py" -m pip --disable-pip-version-check -q)

# torch: keep whatever torch the venv has (a GPU machine brings its own CUDA build);
# otherwise take the pinned CPU build.
if ! "$py" -c "import torch" 2>/dev/null; then
  log "installing torch==$torch_cpu_version"
  "${pip[@]}" install "torch==$torch_cpu_version"
fi

# Pinned Python dependencies and hvdcomp itself (editable), re-run only when the pins change.
stamp=$venv/.hvdcomp-requirements
want=$( (cat "$repo/launch/requirements.txt" "$repo/pyproject.toml"; echo "$mpi") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing pinned requirements and hvdcomp (editable)"
  "${pip[@]}" install -r "$repo/launch/requirements.txt"
  if [ "$mpi" = mpi ]; then "${pip[@]}" install "mpi4py==$mpi4py_version"; fi
  "${pip[@]}" install --no-deps --no-build-isolation -e "$repo"
  echo "$want" > "$stamp"
fi

# Horovod 0.28.1 from its sdist, patched for torch >= 2.1 (C++17) and CMake >= 4.
# The wheel is cached by (python, torch) version: a new venv or clone reuses it.
has_mpi_check="import horovod.torch as h; assert h.mpi_built() == ('$mpi' == 'mpi')"
if "$py" -c "import horovod, horovod.torch; assert horovod.__version__ == '$horovod_version'; $has_mpi_check" 2>/dev/null; then
  log "horovod $horovod_version already installed"
else
  key=$("$py" -c "import sys, torch; print(f'py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}')")-$mpi
  wheel_dir=$cache/horovod-$horovod_version-$key
  if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    log "building horovod $horovod_version from its sdist (about 8 minutes on 2 cores)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "${pip[@]}" download --no-deps --no-binary :all: "horovod==$horovod_version" -d "$work"
    tar -xzf "$work/horovod-$horovod_version.tar.gz" -C "$work"
    src=$work/horovod-$horovod_version
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
      "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    export CMAKE_POLICY_VERSION_MINIMUM=3.5 HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
      HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1 MAKEFLAGS="-j$(nproc)"
    if [ "$mpi" = mpi ]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
    if command -v nvcc >/dev/null 2>&1 && "$py" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
      export HOROVOD_GPU_OPERATIONS=NCCL
    fi
    mkdir -p "$wheel_dir"
    "${pip[@]}" wheel --no-deps --no-build-isolation -w "$wheel_dir" "$src"
  fi
  log "installing horovod from $wheel_dir"
  "${pip[@]}" install --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl
fi

"$venv/bin/horovodrun" --check-build | grep -E "PyTorch|Gloo|MPI|NCCL" | sed 's/^/[setup] /' >&2
