"""Triton error-feedback / DGC momentum kernels against the torch reference.

Both ops are elementwise with the same rounding steps as torch, so results must be
bit-identical (the DGC kernel is launched without FMA contraction for that reason).
"""

import pytest
import torch

from conftest import KERNEL_DEVICE, kernel_vector, requires_triton, spy_on_triton
from hvdcomp import kernels
from hvdcomp.kernels import reference

pytestmark = requires_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 4099]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 2])
def test_ef_accumulate_matches_reference(dtype, n, stride):
    ef = kernels.triton_impl("ef_accumulate_")
    grad = kernel_vector(n, dtype, stride=stride, seed=1)
    buf = kernel_vector(n * 3, seed=2)
    step = 3 if stride > 1 else 1
    residual = buf[::step][:n]
    untouched = buf.clone()
    expected = reference.ef_accumulate_(residual.clone(), grad)

    out = ef(residual, grad)

    assert out is residual
    assert torch.equal(residual, expected)
    # The in-place update goes through the view and nowhere else in its buffer.
    others = torch.ones_like(buf, dtype=torch.bool)
    others[::step][:n] = False
    assert torch.equal(buf[others], untouched[others])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 3])
def test_dgc_momentum_matches_reference(dtype, n, stride):
    dgc = kernels.triton_impl("dgc_momentum_")
    grad = kernel_vector(n, dtype, stride=stride, seed=3)
    u = kernel_vector(n, stride=stride, seed=4)
    v = kernel_vector(n, seed=5)
    u_ref, v_ref = u.clone(), v.clone()
    reference.dgc_momentum_(u_ref, v_ref, grad, 0.9)

    out = dgc(u, v, grad, 0.9)

    assert out is v
    assert torch.equal(u, u_ref)
    assert torch.equal(v, v_ref)


def test_dgc_momentum_two_steps_accumulate():
    """v carries the momentum-corrected gradients of both steps (DGC eq. (5)-(6))."""
    dgc = kernels.triton_impl("dgc_momentum_")
    g1, g2 = kernel_vector(1000, seed=6), kernel_vector(1000, torch.bfloat16, seed=7)
    u, v = torch.zeros(1000, device=KERNEL_DEVICE), torch.zeros(1000, device=KERNEL_DEVICE)
    dgc(u, v, g1, 0.5)
    dgc(u, v, g2, 0.5)
    u1 = g1
    u2 = 0.5 * u1 + g2.float()
    torch.testing.assert_close(u, u2, rtol=1e-6, atol=0)
    torch.testing.assert_close(v, u1 + u2, rtol=1e-6, atol=1e-7)


def test_large_fused_step():
    """One >= 1M-element tensor (several thousand blocks, a ragged last one)."""
    n = (1 << 20) + 77
    grad = kernel_vector(n, torch.float16, seed=8)
    r = kernel_vector(n, seed=9)
    r_ref = reference.ef_accumulate_(r.clone(), grad)
    kernels.triton_impl("ef_accumulate_")(r, grad)
    assert torch.equal(r, r_ref)
    u, v = kernel_vector(n, seed=10), kernel_vector(n, seed=11)
    u_ref, v_ref = u.clone(), v.clone()
    reference.dgc_momentum_(u_ref, v_ref, grad, 0.99)
    kernels.triton_impl("dgc_momentum_")(u, v, grad, 0.99)
    assert torch.equal(u, u_ref) and torch.equal(v, v_ref)


def test_rejects_non_fp32_accumulator_and_size_mismatch():
    ef = kernels.triton_impl("ef_accumulate_")
    with pytest.raises(TypeError):
        ef(torch.zeros(4, dtype=torch.float16, device=KERNEL_DEVICE), torch.zeros(4, device=KERNEL_DEVICE))
    with pytest.raises(ValueError):
        ef(torch.zeros(4, device=KERNEL_DEVICE), torch.zeros(5, device=KERNEL_DEVICE))


@pytest.mark.parametrize("name", ["ef_accumulate_", "dgc_momentum_"])
def test_env_forces_triton_dispatch(monkeypatch, name):
    calls = spy_on_triton(monkeypatch, name)
    grad = kernel_vector(100, torch.bfloat16, seed=12)
    args = {"ef_accumulate_": lambda: (kernel_vector(100, seed=13), grad),
            "dgc_momentum_": lambda: (kernel_vector(100, seed=13), kernel_vector(100, seed=14), grad, 0.9)}[name]

    monkeypatch.setenv("HVDCOMP_KERNELS", "triton")
    got = getattr(kernels, name)(*args())
    assert calls == [name]
    want = getattr(reference, name)(*args())
    assert torch.equal(got, want)

    monkeypatch.setenv("HVDCOMP_KERNELS", "reference")
    getattr(kernels, name)(*args())
    assert calls == [name]
