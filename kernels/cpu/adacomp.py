"""AdaComp's selection, packing and decode in torch: the whole bins of the tensor viewed as
``[nbins, bin_size]``, so that bin maxima are row reductions, and the selection computed
once per step (its positions give the per-bin counts by ``bincount``)."""
from __future__ import annotations

import weakref

import numpy as np
import torch

from ..adacomp_format import adacomp_code_dtype, num_bins
from ..memo import PerTensorVersion
from .compare import nonzero_sparse, numpy_comparable

Tensor = torch.Tensor


def _bin_max_abs(x: Tensor, bin_size: int) -> Tensor:
    """``max |x|`` of each bin, fp32 [nb]: whole bins as rows of a view, the last partial
    bin on its own (no padded copy of ``x``). NaN propagates into its bin's maximum."""
    n = x.numel()
    full = n // bin_size
    ax = x.abs()
    out = torch.empty(num_bins(n, bin_size), dtype=torch.float32, device=x.device)
    if full:
        torch.amax(ax[: full * bin_size].view(full, bin_size), dim=1, out=out[:full])
    if full * bin_size < n:
        out[full:] = ax[full * bin_size:].amax()
    return out


def _adacomp_mask(x: Tensor, g: Tensor, bin_size: int) -> Tensor:
    """Selection mask: ``|x + g| >= max_bin |x|`` and ``x != 0`` (a zero sends nothing);
    each bin's maximum broadcast over its row, never repeated per element."""
    n = x.numel()
    full = n // bin_size
    bin_max = _bin_max_abs(x, bin_size)
    h = torch.add(x, g.to(torch.float32)).abs_()
    if not (numpy_comparable(h) and numpy_comparable(x)):
        per_elem_max = bin_max.repeat_interleave(bin_size)[:n]
        return (h >= per_elem_max) & (x != 0)
    hv, bv = h.numpy(), bin_max.numpy()
    mask = np.empty(n, dtype=bool)
    cut = full * bin_size
    if full:  # NaN compares False: a NaN bin selects nothing
        np.greater_equal(hv[:cut].reshape(full, bin_size), bv[:full, None], out=mask[:cut].reshape(full, bin_size))
    if cut < n:
        np.greater_equal(hv[cut:], bv[full:], out=mask[cut:])
    mask &= np.not_equal(x.numpy(), 0)
    return torch.from_numpy(mask)


#: The selected positions of each tensor, from adacomp_select_stats to adacomp_pack_ of the
#: same step: one selection pass per step instead of two (nothing writes x in between).
_SELECTIONS = PerTensorVersion()


def _selected(x: Tensor, g: Tensor, bin_size: int, last_use: bool) -> Tensor:
    """int64 [m], increasing: the positions :func:`_adacomp_mask` selects."""

    def select() -> Tensor:
        return nonzero_sparse(_adacomp_mask(x, g, bin_size))

    try:
        version = g._version
    except RuntimeError:  # an inference tensor: no version counter, never cached
        return select()
    lookup = _SELECTIONS.take if last_use else _SELECTIONS
    # Kept with a weak reference to g and g's version: an id can be reused once g is gone.
    ref, kept_version, idx = lookup(x, bin_size, lambda: (weakref.ref(g), version, select()))
    return idx if ref() is g and kept_version == version else select()


def adacomp_select_stats(x: Tensor, g: Tensor, bin_size: int) -> tuple[Tensor, Tensor]:
    """Per-bin counts of the mask, and the fp64 sum of the selected ``|x|`` (the positions
    are kept for :func:`adacomp_pack_`)."""
    adacomp_code_dtype(bin_size)
    idx = _selected(x, g, bin_size, last_use=False)
    counts = torch.bincount(idx // bin_size, minlength=num_bins(x.numel(), bin_size)).to(torch.int32)
    abs_sum = x.index_select(0, idx).abs().sum(dtype=torch.float64)
    return counts, abs_sum.reshape(1)


def adacomp_pack_(
    x: Tensor, g: Tensor, bin_size: int, bin_offsets: Tensor, scale: Tensor, codes: Tensor
) -> Tensor:
    """The mask's positions in index order are the codes' order (bin by bin, increasing
    offsets), so ``bin_offsets`` is not read. Checks that ``codes`` has exactly one slot per
    selected element (a host read). A NaN makes its bin's maximum NaN: that bin selects
    nothing here (a kernel may still select its other elements)."""
    idx = _selected(x, g, bin_size, last_use=True)
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
