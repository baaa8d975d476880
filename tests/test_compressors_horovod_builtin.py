"""HorovodCompressor: Horovod's own compressors behind hvdcomp's compressor contract.

The payloads of two simulated ranks are summed as an allreduce would and decoded; the
result must equal what Horovod's optimizer computes with the same compressor
(``decompress(compress(g0) + compress(g1))``), bit for bit.
"""
from __future__ import annotations

import pytest
import torch

from distributed import requires_horovod
from hvdcomp import Compression, Compressor, TensorInfo
from hvdcomp.compressors.horovod_builtin import HorovodCompressor, as_hvdcomp_compressor


def _info(t: torch.Tensor) -> TensorInfo:
    return TensorInfo(name="w", shape=t.shape, dtype=t.dtype, device=t.device, size=2)


def _exchange(comp: Compressor, grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the ranks' dense payloads, decoded (what hvdcomp's allreduce path does)."""
    info = _info(grads[0])
    encoded = [comp.encode_dense(g, {}, info, 0) for g in grads]
    summed = sum(p for p, _ in encoded)
    return comp.decode_dense(summed, encoded[0][1], {}, info)


@requires_horovod
@pytest.mark.parametrize("which", ["none", "fp16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_horovod_builtin_matches_horovod(which, dtype):
    from horovod.torch.compression import Compression as HvdCompression

    inner = getattr(HvdCompression, which)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 5, generator=gen).to(dtype) for _ in range(2)]
    payloads = [inner.compress(g) for g in grads]
    expected = inner.decompress(payloads[0][0] + payloads[1][0], payloads[0][1])

    comp = HorovodCompressor(inner)
    assert comp.transport == "allreduce" and comp.linear
    got = _exchange(comp, grads)
    assert got.dtype == torch.float32 and got.shape == grads[0].shape
    assert torch.equal(got, expected.to(torch.float32))
    # Horovod's own contract passes straight through.
    payload, ctx = comp.compress(grads[0])
    assert payload.dtype == payloads[0][0].dtype
    assert torch.equal(comp.decompress(payload, ctx), inner.decompress(payloads[0][0], payloads[0][1]))


@requires_horovod
def test_config_names_the_horovod_class():
    import horovod.torch as hvd

    assert HorovodCompressor(hvd.Compression.fp16).config() == {
        "name": "horovod", "compressor": "horovod.torch.compression.FP16Compressor"}
    assert HorovodCompressor(hvd.Compression.none()).config()["compressor"] == \
        "horovod.torch.compression.NoneCompressor"
    assert HorovodCompressor(hvd.Compression.none).config() != HorovodCompressor(hvd.Compression.fp16).config()


class _Int8Scaled:
    """A user's Horovod-style compressor (static methods, no Horovod base class)."""

    @staticmethod
    def compress(tensor):
        return (tensor * 4).round(), tensor.dtype

    @staticmethod
    def decompress(tensor, ctx):
        return (tensor / 4).to(ctx)


def test_any_horovod_style_compressor():
    grads = [torch.tensor([0.25, -1.0, 2.5]), torch.tensor([0.5, 0.75, -0.25])]
    got = _exchange(HorovodCompressor(_Int8Scaled), grads)
    assert torch.equal(got, torch.tensor([0.75, -0.25, 2.25]))
    assert HorovodCompressor(_Int8Scaled()).config()["compressor"].endswith("._Int8Scaled")


def test_as_hvdcomp_compressor():
    ours = Compression.fp16()
    assert as_hvdcomp_compressor(ours) is ours
    wrapped = as_hvdcomp_compressor(_Int8Scaled)
    assert isinstance(wrapped, HorovodCompressor) and wrapped.inner is _Int8Scaled


def test_bad_input():
    with pytest.raises(ValueError, match="already an hvdcomp compressor"):
        HorovodCompressor(Compression.none())
    with pytest.raises(ValueError, match="pass an instance"):
        HorovodCompressor(type(Compression.fp16()))
    with pytest.raises(ValueError, match="compress"):
        HorovodCompressor("fp16")
    with pytest.raises(ValueError, match="compress"):
        as_hvdcomp_compressor(None)
