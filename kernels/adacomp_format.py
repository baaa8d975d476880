"""AdaComp's bins and code width (Chen et al., "AdaComp: Adaptive Residual Gradient
Compression for Data-Parallel Distributed Training", AAAI 2018), shared by both backends and
by the compressor that sizes its payload with them.

A tensor of n elements is cut into bins of ``bin_size`` (L_T) elements, the last one possibly
short. A sent element is coded in one integer, ``(offset_in_bin << 2) | sign_code``: 2 bits
of sign and the offset above them, so the bin size fixes the code's width.
"""
from __future__ import annotations

import torch

#: Largest bin whose offsets fit a uint8 code (6-bit offset + 2-bit sign).
ADACOMP_MAX_BIN_8BIT = 64
#: Largest bin whose offsets fit an int16 code (14-bit offset + 2-bit sign).
ADACOMP_MAX_BIN_16BIT = 16384


def num_bins(numel: int, bin_size: int) -> int:
    """Number of AdaComp bins of ``bin_size`` elements covering ``numel`` (last may be short)."""
    return (numel + bin_size - 1) // bin_size


def adacomp_code_dtype(bin_size: int) -> torch.dtype:
    """Code dtype for a bin size: uint8 up to 64 elements per bin, int16 up to 16384 (read
    as unsigned 16-bit by the decoders). Raises ValueError outside [2, 16384]."""
    if not 2 <= bin_size <= ADACOMP_MAX_BIN_16BIT:
        raise ValueError(f"AdaComp bin_size must be in [2, {ADACOMP_MAX_BIN_16BIT}], got {bin_size}")
    return torch.uint8 if bin_size <= ADACOMP_MAX_BIN_8BIT else torch.int16
