"""Triton's real GPU compiler without a GPU: a compile-only driver and what it compiled.

While :func:`compile_only` is active, ``triton.runtime.driver.active`` is a
:class:`CompileOnlyDriver` that reports a CUDA target (sm_80 or sm_90, warp size 32),
device ``arch`` and stream 0, and whose launcher and ``utils.load_binary`` load and launch
nothing. The project's own launch code (``hvdcomp.kernels.<module>.<op>``) then runs as on a
GPU: ``JITFunction.run`` specializes each call on its arguments (dtypes, 16-byte pointer
alignment, integers equal to 1 or divisible by 16, constexprs) and sends every new
specialization through the whole pipeline (TTIR, TTGIR, LLVM IR, PTX, and a cubin from the
``ptxas`` shipped in the Triton wheel). Tensors may live on the CPU (or the meta device):
their pointers are only inspected, never dereferenced.

Outputs of the skipped launches are whatever ``torch.empty`` held: no result computed under
this driver means anything, and launch code that reads an output on the host sees garbage.

Needs Triton imported *without* ``TRITON_INTERPRET=1`` (under the interpreter ``@triton.jit``
gives interpreted functions that never compile): run it in a fresh process.
"""
from __future__ import annotations

import contextlib
import importlib
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

#: Kernel modules under ``hvdcomp.kernels`` (``kernels/`` in the repository).
KERNEL_MODULES = ("residual", "casts", "decode", "packing", "adacomp", "ternary", "topk", "_launch")

#: Shared memory per block the CUDA driver allows at most (opt-in), by compute capability:
#: 163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100/H200). A kernel asking for more fails to
#: load there, so the compile-only driver refuses it as the real one would.
MAX_SHARED = {80: 166912, 90: 232448}


class _NoLaunch:
    """Launcher of a compiled kernel that launches nothing."""

    def __init__(self, src, metadata):
        self.src, self.metadata = src, metadata

    def __call__(self, *args, **kwargs):
        return None


class _Utils:
    def __init__(self, arch: int):
        self.arch = arch

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads): nothing is loaded; the
        # register figures come from ptxas (see ptxas_usage), 1024 threads per block.
        return object(), object(), 0, 0, 1024

    def unload_module(self, module):
        return None

    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED[self.arch], "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32}


class CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: a CUDA target of compute capability ``arch``."""

    def __init__(self, arch: int):
        if arch not in MAX_SHARED:
            raise ValueError(f"compute capability must be one of {sorted(MAX_SHARED)}, got {arch}")
        self.arch = arch
        self.utils = _Utils(arch)
        self.launcher_cls = _NoLaunch

    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    # One device id per target, so that JITFunction.device_caches keeps sm_80 and sm_90
    # specializations apart within one process.
    def get_current_device(self):
        return self.arch

    def set_current_device(self, device):
        return None

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_device_capability(self, device=None):
        return divmod(self.arch, 10)

    def map_python_to_cpp_type(self, ty: str) -> str:
        return triton.runtime.driver.default.map_python_to_cpp_type(ty)

    def get_benchmarker(self):
        raise RuntimeError("the compile-only driver cannot time kernels")


@contextlib.contextmanager
def compile_only(arch: int):
    """Make :class:`CompileOnlyDriver` (``arch`` = 80 or 90) Triton's active driver inside."""
    from triton.runtime import driver

    previous = driver._active
    driver.set_active(CompileOnlyDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


def jit_functions() -> dict[str, JITFunction]:
    """Every ``@triton.jit`` function defined in the kernel modules, by ``module.name``
    (helpers imported from another module are listed under the module defining them)."""
    found = {}
    for short in KERNEL_MODULES:
        module = importlib.import_module(f"hvdcomp.kernels.{short}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__:
                found[f"{short}.{name}"] = obj
    if not found:
        raise RuntimeError("no JITFunction found: is TRITON_INTERPRET set? (it must not be)")
    return found


def callees(fn: JITFunction) -> set[JITFunction]:
    """The ``@triton.jit`` functions ``fn`` calls, directly or through other helpers (read
    from the global names its code uses)."""
    seen: set[int] = set()
    out: set[JITFunction] = set()
    stack = [fn]
    while stack:
        f = stack.pop()
        for name in f.fn.__code__.co_names:
            g = f.fn.__globals__.get(name)
            if isinstance(g, JITFunction) and id(g) not in seen:
                seen.add(id(g))
                out.add(g)
                stack.append(g)
    return out


def compiled_kernels(fn: JITFunction, arch: int) -> list:
    """The CompiledKernel objects ``fn`` holds for target ``arch`` (one per specialization)."""
    if arch not in fn.device_caches:
        return []
    kernel_cache = fn.device_caches[arch][0]
    return [k for k in kernel_cache.values() if hasattr(k, "asm")]


_PTXAS_LINE = re.compile(
    r"Used (?P<regs>\d+) registers|(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, "
    r"(?P<ld>\d+) bytes spill loads|(?P<smem>\d+) bytes smem")
_RES_USAGE = re.compile(r"REG:(?P<regs>\d+) STACK:(?P<stack>\d+) SHARED:(?P<smem>\d+) LOCAL:(?P<local>\d+)")


def _ptxas_flags(kernel) -> list[str]:
    """The options Triton's ``make_cubin`` gives ptxas for this kernel (bar file names)."""
    import inspect

    from triton.backends.nvidia.compiler import CUDABackend

    flags = ["-lineinfo"]
    if not getattr(kernel.metadata, "enable_fp_fusion", True):
        flags.append("--fmad=false")
    if "--regAllocOptLevel=2" in inspect.getsource(CUDABackend.make_cubin):  # Triton >= 3.8
        flags.append("--regAllocOptLevel=2")
    return flags


def ptxas_usage(kernel, arch: int) -> dict:
    """Resource usage of one compiled kernel on target ``arch``.

    ``regs`` (per thread), ``stack`` and ``local`` (bytes per thread) and ``static_smem``
    come from ``cuobjdump -res-usage`` on the very cubin Triton built; ``spill_stores`` and
    ``spill_loads`` (bytes) from ``ptxas -v`` re-run on its PTX with Triton's options (Triton
    discards that log); ``shared`` is Triton's dynamic shared-memory allocation (metadata).
    Both tools are the ones shipped in the Triton wheel. ``ptxas_log`` keeps the raw log.
    """
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    tool_dir = Path(get_ptxas(arch).path).parent
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(kernel.asm["ptx"])
        proc = subprocess.run([get_ptxas(arch).path, *_ptxas_flags(kernel), "-v",
                               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(tmp) / "p.o")],
                              capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        if proc.returncode:
            raise RuntimeError(f"ptxas -v failed on {kernel.name}: {log}")
        cubin.write_bytes(kernel.asm["cubin"])
        res = subprocess.run([str(tool_dir / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True)
    usage = {"spill_stores": 0, "spill_loads": 0}
    for m in _PTXAS_LINE.finditer(log):
        if m["stack"]:
            usage["spill_stores"] += int(m["st"])
            usage["spill_loads"] += int(m["ld"])
    found = _RES_USAGE.search(res.stdout)
    if res.returncode or not found:
        raise RuntimeError(f"cuobjdump -res-usage failed on {kernel.name}: {res.stdout}{res.stderr}")
    usage.update(regs=int(found["regs"]), stack=int(found["stack"]), local=int(found["local"]),
                 static_smem=int(found["smem"]), shared=int(kernel.metadata.shared), ptxas_log=log.strip())
    return usage
