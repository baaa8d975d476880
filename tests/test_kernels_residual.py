"""Error-feedback accumulation and DGC momentum correction, both backends against the oracle.

Both ops are elementwise with the oracle's rounding steps, so results must be bit-identical
(the DGC kernel is launched without FMA contraction for that reason).
"""

import pytest
import torch

import kernel_oracle as oracle
from conftest import BACKENDS, KERNEL_DEVICE, kernel_impl, kernel_vector

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 4099]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 2])
def test_ef_accumulate_matches_oracle(backend, dtype, n, stride):
    grad = kernel_vector(n, dtype, stride=stride, seed=1)
    buf = kernel_vector(n * 3, seed=2)
    step = 3 if stride > 1 else 1
    residual = buf[::step][:n]
    untouched = buf.clone()
    expected = oracle.ef_accumulate(residual, grad)

    out = kernel_impl(backend, "ef_accumulate_")(residual, grad)

    assert out is residual
    assert torch.equal(residual.cpu(), expected)
    # The in-place update goes through the view and nowhere else in its buffer.
    others = torch.ones_like(buf, dtype=torch.bool)
    others[::step][:n] = False
    assert torch.equal(buf[others], untouched[others])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_ef_accumulate_into_out_leaves_the_residual(backend, dtype, n):
    """``out=``: ``r + g`` written there (a strided view too), the residual only read (how
    a staged residual is written, hvdcomp.core.faults)."""
    grad = kernel_vector(n, dtype, seed=1)
    residual = kernel_vector(n, seed=2)
    before = residual.clone()
    out = torch.full((2 * n,), float("nan"), device=KERNEL_DEVICE)[::2]

    ret = kernel_impl(backend, "ef_accumulate_")(residual, grad, out=out)

    assert ret is out
    assert torch.equal(out.cpu(), oracle.ef_accumulate(before, grad))
    assert torch.equal(residual, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("stride", [1, 3])
def test_dgc_momentum_matches_oracle(backend, dtype, n, stride):
    grad = kernel_vector(n, dtype, stride=stride, seed=3)
    u = kernel_vector(n, stride=stride, seed=4)
    v = kernel_vector(n, seed=5)
    u_want, v_want = oracle.dgc_momentum(u, v, grad, 0.9)

    out = kernel_impl(backend, "dgc_momentum_")(u, v, grad, 0.9)

    assert out is v
    assert torch.equal(u.cpu(), u_want)
    assert torch.equal(v.cpu(), v_want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_dgc_momentum_into_out_leaves_its_inputs(backend, dtype, n):
    """``out=(u_out, v_out)``: the oracle's new u and v there (strided outputs too), u and v
    only read (how DGC's staged state is written, hvdcomp.core.faults)."""
    grad = kernel_vector(n, dtype, seed=3)
    u, v = kernel_vector(n, seed=4), kernel_vector(n, stride=2, seed=5)
    u_in, v_in = u.clone(), v.clone()
    u_out, v_out = kernel_vector(n, stride=3, seed=6), torch.full((n,), float("nan"), device=KERNEL_DEVICE)
    u_want, v_want = oracle.dgc_momentum(u_in, v_in, grad, 0.9)

    ret = kernel_impl(backend, "dgc_momentum_")(u, v, grad, 0.9, out=(u_out, v_out))

    assert ret is v_out
    assert torch.equal(u_out.cpu(), u_want) and torch.equal(v_out.cpu(), v_want)
    assert torch.equal(u, u_in) and torch.equal(v, v_in)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dgc_momentum_two_steps_accumulate(backend):
    """v carries the momentum-corrected gradients of both steps (DGC eq. (5)-(6))."""
    dgc = kernel_impl(backend, "dgc_momentum_")
    g1, g2 = kernel_vector(1000, seed=6), kernel_vector(1000, torch.bfloat16, seed=7)
    u, v = torch.zeros(1000, device=KERNEL_DEVICE), torch.zeros(1000, device=KERNEL_DEVICE)
    dgc(u, v, g1, 0.5)
    dgc(u, v, g2, 0.5)
    u1 = g1
    u2 = 0.5 * u1 + g2.float()
    torch.testing.assert_close(u, u2, rtol=1e-6, atol=0)
    torch.testing.assert_close(v, u1 + u2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_fused_step(backend):
    """One >= 1M-element tensor (several thousand blocks, a ragged last one)."""
    n = (1 << 20) + 77
    grad = kernel_vector(n, torch.float16, seed=8)
    r = kernel_vector(n, seed=9)
    r_want = oracle.ef_accumulate(r, grad)
    kernel_impl(backend, "ef_accumulate_")(r, grad)
    assert torch.equal(r.cpu(), r_want)
    u, v = kernel_vector(n, seed=10), kernel_vector(n, seed=11)
    u_want, v_want = oracle.dgc_momentum(u, v, grad, 0.99)
    kernel_impl(backend, "dgc_momentum_")(u, v, grad, 0.99)
    assert torch.equal(u.cpu(), u_want) and torch.equal(v.cpu(), v_want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_size_mismatch(backend):
    ef = kernel_impl(backend, "ef_accumulate_")
    with pytest.raises((ValueError, RuntimeError)):
        ef(torch.zeros(4, device=KERNEL_DEVICE), torch.zeros(5, device=KERNEL_DEVICE))


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_kernel_rejects_non_fp32_accumulator(backend):
    with pytest.raises(TypeError):
        kernel_impl(backend, "ef_accumulate_")(torch.zeros(4, dtype=torch.float16, device=KERNEL_DEVICE),
                                               torch.zeros(4, device=KERNEL_DEVICE))
