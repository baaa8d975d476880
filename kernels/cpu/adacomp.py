"""AdaComp's selection, packing and decode in torch: the tensor padded to whole bins and
viewed as ``[nbins, bin_size]``, so that bin maxima and counts are row reductions."""
from __future__ import annotations

import torch

from ..adacomp_format import adacomp_code_dtype, num_bins
from .compare import nonzero_sparse

Tensor = torch.Tensor


def _adacomp_mask(x: Tensor, g: Tensor, bin_size: int) -> Tensor:
    """Selection mask: ``|x + g| >= max_bin |x|`` and ``x != 0`` (a zero sends nothing)."""
    n = x.numel()
    nb = num_bins(n, bin_size)
    ax = x.abs()
    padded = torch.zeros(nb * bin_size, dtype=torch.float32, device=x.device)
    padded[:n] = ax
    bin_max = padded.view(nb, bin_size).amax(dim=1)
    per_elem_max = bin_max.repeat_interleave(bin_size)[:n]
    h = (x + g.to(torch.float32)).abs()
    return (h >= per_elem_max) & (x != 0)


def adacomp_select_stats(x: Tensor, g: Tensor, bin_size: int) -> tuple[Tensor, Tensor]:
    """Per-bin counts of the mask, and the fp64 sum of the selected ``|x|``."""
    adacomp_code_dtype(bin_size)
    n = x.numel()
    nb = num_bins(n, bin_size)
    mask = _adacomp_mask(x, g, bin_size)
    padded = torch.zeros(nb * bin_size, dtype=torch.int32, device=x.device)
    padded[:n] = mask.to(torch.int32)
    counts = padded.view(nb, bin_size).sum(dim=1, dtype=torch.int32)
    abs_sum = torch.where(mask, x.abs(), torch.zeros((), device=x.device)).sum(dtype=torch.float64)
    return counts, abs_sum.reshape(1)


def adacomp_pack_(
    x: Tensor, g: Tensor, bin_size: int, bin_offsets: Tensor, scale: Tensor, codes: Tensor
) -> Tensor:
    """The mask's positions in index order are the codes' order (bin by bin, increasing
    offsets), so ``bin_offsets`` is not read. Checks that ``codes`` has exactly one slot per
    selected element (a host read). A NaN makes its bin's maximum NaN: that bin selects
    nothing here (a kernel may still select its other elements)."""
    mask = _adacomp_mask(x, g, bin_size)
    idx = nonzero_sparse(mask)
    if idx.numel() != codes.numel():
        raise ValueError(f"codes has {codes.numel()} slots but {idx.numel()} elements are selected")
    vals = x.index_select(0, idx)
    sign_code = torch.where(vals > 0, 1, 2)
    code = ((idx % bin_size) << 2) | sign_code
    codes.copy_(code.to(codes.dtype))
    s = scale.to(torch.float32).reshape(())
    x.index_copy_(0, idx, vals - torch.sign(vals) * s)
    return codes


def adacomp_decode_sum(
    codes: Tensor, bin_counts: Tensor, scales: Tensor, bin_size: int, numel: int
) -> Tensor:
    """Each code's bin and rank from the counts by ``repeat_interleave``, then one
    ``index_add_`` of ``±scale`` (codes in rank order). Raises on a code that addresses an
    element at or past ``numel``."""
    nranks, nb = bin_counts.shape
    out = torch.zeros(numel, dtype=torch.float32, device=codes.device)
    if codes.numel() == 0:
        return out
    flat_counts = bin_counts.reshape(-1).to(torch.int64)
    bin_of_code = torch.arange(nranks * nb, device=codes.device).repeat_interleave(flat_counts) % nb
    rank_of_code = torch.arange(nranks, device=codes.device).repeat_interleave(
        bin_counts.to(torch.int64).sum(dim=1)
    )
    c = codes.to(torch.int64) & 0xFFFF  # int16 codes read as unsigned
    index = bin_of_code * bin_size + (c >> 2)
    sign = torch.where((c & 3) == 1, 1.0, -1.0)
    return out.index_add_(0, index, sign * scales.to(torch.float32)[rank_of_code])
