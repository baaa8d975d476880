"""Test set-up shared by every test module.

Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors; that has
to be chosen before Triton is first imported, so it is set here.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


HAS_TRITON = _triton_importable()
#: Device on which kernel tests put their tensors: the GPU when there is one, else CPU
#: (the interpreter runs Triton kernels on CPU tensors).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")

#: The kernel backends, to parametrize a test by: ``"cpu"`` (``hvdcomp.kernels.cpu``) and
#: ``"triton"`` (skipped without Triton).
BACKENDS = ["cpu", pytest.param("triton", marks=requires_triton)]


def kernel_impl(backend: str, name: str):
    """Kernel operation ``name`` of ``backend`` (``"cpu"`` or ``"triton"``), called directly."""
    from hvdcomp import kernels

    return kernels.cpu_impl(name) if backend == "cpu" else kernels.triton_impl(name)


def kernel_vector(n: int, dtype=torch.float32, stride: int = 1, seed: int = 0, ints: bool = False):
    """n values on KERNEL_DEVICE: standard normal, or small integers in [-3, 3] with ``ints``
    (exact ties with integer thresholds); stride > 1 gives a non-contiguous view."""
    gen = torch.Generator().manual_seed(seed)
    if ints:
        base = torch.randint(-3, 4, (n * stride,), generator=gen).float()
    else:
        base = torch.randn(n * stride, generator=gen)
    base = base.to(dtype).to(KERNEL_DEVICE)
    return base[::stride] if stride > 1 else base


def kernel_scalar(value: float):
    """A one-element fp32 tensor on KERNEL_DEVICE (the kernels' scalar operands)."""
    return torch.tensor([value], dtype=torch.float32, device=KERNEL_DEVICE)


@pytest.fixture
def device() -> str:
    return KERNEL_DEVICE
