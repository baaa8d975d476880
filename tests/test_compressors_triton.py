"""The method compressors on the Triton kernels (``HVDCOMP_KERNELS=triton``; without a GPU
they run under ``TRITON_INTERPRET=1``, set by conftest) against the same steps on the torch
reference: same payload sizes, same selections and codes, same decoded sums and states.
Every kernel a case lists must have a Triton implementation (a missing one fails the case)."""
from __future__ import annotations

import pytest
import torch

from hvdcomp import kernels
from hvdcomp.registry import compression_from_name

from tensor_ranks import Ranks
from conftest import KERNEL_DEVICE, requires_triton

pytestmark = requires_triton

#: name -> (params, shape, the dispatched kernels its encode/decode call)
CASES = {
    "adacomp": ({"bin_size": 50}, (37, 29),
                ["ef_accumulate_", "adacomp_select_stats", "adacomp_pack_", "adacomp_decode_sum"]),
    "adacomp_fc": ({"fc_bin_size": 300}, (3, 401),
                   ["ef_accumulate_", "adacomp_select_stats", "adacomp_pack_", "adacomp_decode_sum"]),
    # rng="philox": the torch path draws the kernel's stream (its default on a CPU is torch's
    # generator, see TernGradCompressor), so both paths must give the same codes.
    "terngrad": ({"seed": 5, "rng": "philox"}, (37, 29), ["terngrad_ternarize", "ternary_decode_sum"]),
    "dgc": ({"ratio": 0.05, "rng": "philox"}, (37, 29),  # Philox sample positions on both paths
            ["dgc_momentum_", "sampled_threshold", "count_above", "compact_above", "scatter_add_"]),
    "topk": ({"ratio": 0.05}, (37, 29), ["ef_accumulate_", "topk_indices", "scatter_add_"]),
    "randomk": ({"ratio": 0.05}, (37, 29), ["ef_accumulate_", "scatter_add_"]),
    "onebit": ({}, (37, 29), ["ef_accumulate_", "sign_pack", "sign_decode_sum"]),
}


def missing_kernels(ops):
    missing = []
    for op in ops:
        try:
            kernels.triton_impl(op)
        except (ImportError, AttributeError):
            missing.append(op)
    return missing


def run(name, params, shape, dtype, mode, monkeypatch):
    monkeypatch.setenv("HVDCOMP_KERNELS", mode)
    assert kernels.use_triton(torch.zeros(1, device=KERNEL_DEVICE)) == (mode == "triton")
    comp = compression_from_name(name.split("_")[0], **params)
    ranks = Ranks(comp, shape, nranks=2, dtype=dtype, device=KERNEL_DEVICE)
    history = []
    for t in range(3):
        grads = [(torch.randn(shape, generator=torch.Generator().manual_seed(10 * t + r)) * (r + 1)).to(
            device=KERNEL_DEVICE, dtype=dtype) for r in range(2)]
        if t == 0:
            grads[1] = torch.zeros_like(grads[1])  # a rank that selects nothing
        ex = ranks.step(grads)
        history.append((ex, [{k: v.clone() for k, v in s.items()} for s in ranks.states]))
    return history


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_path_matches_reference(case, dtype, monkeypatch):
    params, shape, ops = CASES[case]
    assert not missing_kernels(ops), f"no Triton implementation of {missing_kernels(ops)}"
    ref = run(case, params, shape, dtype, "reference", monkeypatch)
    tri = run(case, params, shape, dtype, "triton", monkeypatch)
    for (er, sr), (et, st) in zip(ref, tri):
        assert et.sizes == er.sizes
        for pr, pt in zip(er.payloads, et.payloads):
            if pr.dtype == torch.uint8 and (case.startswith("adacomp") or case == "onebit"):
                # scale (a float sum, order may differ) then counts/codes or sign bits (exact)
                torch.testing.assert_close(pt[:4].view(torch.float32), pr[:4].view(torch.float32), rtol=1e-6, atol=0)
                assert torch.equal(pt[4:].cpu(), pr[4:].cpu())
            elif pr.dtype == torch.uint8:
                assert torch.equal(pt.cpu(), pr.cpu())
        for tr, tt in zip(er.totals, et.totals):
            torch.testing.assert_close(tt.cpu(), tr.cpu(), rtol=1e-6, atol=1e-6)
        for a, b in zip(sr, st):
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(b[key].cpu(), a[key].cpu(), rtol=1e-6, atol=1e-6)
