"""AdaComp: adaptive residual gradient compression (Chen, Choi, Brand, Agrawal, Zhang and
Gopalakrishnan, "AdaComp: Adaptive Residual Gradient Compression for Data-Parallel
Distributed Training", AAAI 2018, Sec. "Gradient compression").

Per tensor of n elements and step (flat view, laid out as PyTorch stores the weight, i.e.
out-maps x in-maps x kernel rows x kernel cols for a convolution):

1. error feedback: ``x = r + g`` (the accumulated residue);
2. cut ``x`` into bins of ``L_T`` consecutive elements (the last bin may be shorter);
   ``m_b = max_{i in bin b} |x_i|``;
3. select element i when ``|x_i + g_i| >= m_b`` (the residue plus 2x the latest gradient
   reaches the bin's max: the paper's self-adjusting soft threshold) and ``x_i != 0``;
4. quantize the selected values to ``s * sign(x_i)`` with one scale per tensor
   ``s = mean of |x_i| over the selected`` (0 when nothing is selected);
5. ``r = x - s * sign(x) * selected``.

Nothing is sorted: two O(n) passes (``kernels.adacomp_select_stats``, then
``kernels.adacomp_pack_`` which also writes the residual). The number of selected elements
adapts to the data, so the payload size is known on the device only; the transport reads the
sizes of a whole bucket at once.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .. import kernels, wire
from ..compressor import Compressor, Encoded, ErrorFeedback, State, TensorInfo
from .common import accumulate_residual, exact_views, flat_grad

Tensor = torch.Tensor

#: Bin size limits: 2 (a bin of one element would send everything) to 16384 (14-bit offsets).
MIN_BIN_SIZE = 2
MAX_BIN_SIZE = kernels.ADACOMP_MAX_BIN_16BIT


def _check_bin_size(label: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BIN_SIZE <= value <= MAX_BIN_SIZE:
        raise ValueError(f"adacomp {label} must be an integer in [{MIN_BIN_SIZE}, {MAX_BIN_SIZE}], got {value!r}")
    return value


def count_dtype(bin_size: int) -> torch.dtype:
    """Dtype of the per-bin counts on the wire: uint8 while a count (<= bin_size) fits in a
    byte (bin_size <= 255), else int16 (bin_size <= 16384)."""
    return torch.uint8 if bin_size <= 255 else torch.int16


def header_fields(numel: int, bin_size: int) -> list:
    """The fixed-length head of an AdaComp payload: ``scale fp32 [1] | bin_counts [nbins]``."""
    return [(torch.float32, 1), (count_dtype(bin_size), kernels.num_bins(numel, bin_size))]


class AdaCompCompressor(ErrorFeedback, Compressor):
    """AdaComp with error feedback (see the module docstring for the algorithm).

    Bin size ``L_T`` per tensor (:meth:`bin_size_for`): ``bin_size`` if given (all tensors);
    else ``bin_sizes[parameter name]`` if the name is there; else ``conv_bin_size`` (paper:
    50) for tensors of 3 or more dimensions (convolutions) and ``fc_bin_size`` (paper: 500)
    for 2-D and 1-D tensors (fully connected, LSTM, biases). Every bin size is an integer in
    [2, 16384].

    Wire (allgather), for n elements, ``nb = ceil(n / L_T)`` bins and m selected elements::

        scale     fp32 [1]
        bin_counts uint8 [nb] if L_T <= 255 else int16 [nb]   (selected per bin)
        codes     uint8 [m] if L_T <= 64 else int16 [m]        (offset_in_bin << 2 | sign)

    (each field aligned to its item size; m follows from the exact payload length). Sign code
    1 = +s, 2 = -s; codes of bin b follow those of bins < b, in increasing offset. Size:
    ``4 + c*nb + b*m`` bytes (c, b: count and code byte widths) against 4n dense, i.e. ratio
    ``4n / (4 + c*n/L_T + b*m)``; with the paper's typical few selected per bin this is
    about 40-70x for L_T = 50 and about 200x for L_T = 500.

    State: ``{"residual": fp32 [n]}``, staged (written whole each step). Gradients fp32/fp16/bf16 of any shape.
    """

    name = "adacomp"
    transport = "allgather"
    staged_state = ("residual",)

    def __init__(self, bin_size: int | None = None, conv_bin_size: int = 50, fc_bin_size: int = 500,
                 bin_sizes: Mapping[str, int] | None = None):
        self.bin_size = None if bin_size is None else _check_bin_size("bin_size", bin_size)
        self.conv_bin_size = _check_bin_size("conv_bin_size", conv_bin_size)
        self.fc_bin_size = _check_bin_size("fc_bin_size", fc_bin_size)
        if bin_sizes is not None and not isinstance(bin_sizes, Mapping):
            raise ValueError(f"adacomp bin_sizes must be a dict of parameter name -> bin size, got {bin_sizes!r}")
        self.bin_sizes = {str(k): _check_bin_size(f"bin_sizes[{k!r}]", v) for k, v in sorted((bin_sizes or {}).items())}

    def config(self) -> dict:
        """Settings that must match on every rank (name and all bin sizes)."""
        return {"name": self.name, "bin_size": self.bin_size, "conv_bin_size": self.conv_bin_size,
                "fc_bin_size": self.fc_bin_size, "bin_sizes": dict(self.bin_sizes)}

    def bin_size_for(self, info: TensorInfo) -> int:
        """``L_T`` for the tensor ``info`` (global override, then by name, then by shape)."""
        if self.bin_size is not None:
            return self.bin_size
        if info.name in self.bin_sizes:
            return self.bin_sizes[info.name]
        return self.conv_bin_size if len(info.shape) >= 3 else self.fc_bin_size

    def _layout(self, info: TensorInfo):
        bin_size = self.bin_size_for(info)
        header = header_fields(info.numel, bin_size)
        code_dtype = kernels.adacomp_code_dtype(bin_size)
        return bin_size, header, code_dtype

    def selected_count(self, payload_bytes: int, info: TensorInfo) -> int:
        """Codes (selected elements) in a payload of ``payload_bytes`` for tensor ``info``."""
        _, header, code_dtype = self._layout(info)
        return wire.trailing_count(payload_bytes, header, code_dtype)

    def init_state(self, info: TensorInfo) -> State:
        """``{"residual": fp32 [n] zeros}`` on ``info.device``."""
        return {"residual": torch.zeros(info.numel, dtype=torch.float32, device=info.device)}

    def encode(self, grad: Tensor, state: State, info: TensorInfo, step: int) -> Encoded:
        """Pass 1 (x = r + g, per-bin counts, scale); the size stays on the device."""
        bin_size, header, code_dtype = self._layout(info)
        g = flat_grad(grad, info)
        x = accumulate_residual(state, g)
        counts, abs_sum = kernels.adacomp_select_stats(x, g, bin_size)
        total = counts.sum(dtype=torch.int64).reshape(1)
        codes_at = wire.layout(header + [(code_dtype, 0)])[0][-1]
        nbytes = total * wire.itemsize(code_dtype) + codes_at

        def pack(out: Tensor) -> None:
            m = wire.trailing_count(out.numel(), header, code_dtype)
            out_scale, out_counts, out_codes = wire.views(out, header + [(code_dtype, m)])
            # s = mean |x| over the selected (0 if none): minimises the squared quantization
            # error for the fixed sign pattern.
            # (abs_sum is fp64: a mean of finite fp32 magnitudes, it fits fp32 again.)
            scale = torch.where(total > 0, abs_sum / total.clamp(min=1).to(torch.float64),
                                torch.zeros_like(abs_sum)).to(torch.float32)
            out_scale.copy_(scale)
            out_counts.copy_(counts)
            offsets = torch.cumsum(counts, 0, dtype=torch.int64) - counts  # exclusive prefix sum
            # Pass 2: writes the codes straight into the payload and x -> new residual.
            kernels.adacomp_pack_(x, g, bin_size, offsets, scale, out_codes)

        return Encoded(nbytes=nbytes, pack=pack)

    def decode_sum(self, payloads: list, state: State, info: TensorInfo) -> Tensor:
        """Sum of the N ranks' payloads as fp32 of ``info.shape``: one
        ``kernels.adacomp_decode_sum`` over all ranks' codes, counts and scales."""
        bin_size, header, code_dtype = self._layout(info)
        if not payloads:
            return torch.zeros(info.shape, dtype=torch.float32, device=info.device)
        scales, counts, codes = [], [], []
        for p in payloads:
            m = wire.trailing_count(p.numel(), header, code_dtype)
            s, c, k = exact_views(p, header + [(code_dtype, m)])
            scales.append(s)
            counts.append(c)
            codes.append(k)
        total = kernels.adacomp_decode_sum(torch.cat(codes), torch.stack(counts).to(torch.int32),
                                           torch.cat(scales), bin_size, info.numel)
        return total.view(info.shape)
