"""Threshold selection: exact top-k by a sampled candidate search, DGC's sampled threshold, and
count + compaction above a threshold sharing one mask."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..memo import PerTensorVersion
from .compare import at_least, magnitude_at_least, nonzero_sparse, numpy_comparable

Tensor = torch.Tensor


def _magnitude_key(x: Tensor) -> Tensor:
    # |x| as an ordered integer: the bit pattern of a non-negative float orders like its value,
    # and NaN (exponent all ones, mantissa non-zero) lands above inf.
    return x.to(torch.float32).contiguous().view(torch.int32) & 0x7FFFFFFF


#: Below this many elements, or above this fraction kept, ``torch.topk`` on every key is as
#: cheap as the candidate search (which only pays when the candidates are few).
_TOPK_SEARCH_MIN_NUMEL = 1 << 15
_TOPK_SEARCH_MAX_FRACTION = 1.0 / 16
#: The sample holds about this many elements above the k-th largest key (see _topk_candidates).
_TOPK_SAMPLE_HITS = 64


def _weyl_sample(numel: int, size: int, device) -> Tensor:
    # Positions frac(j * phi) * numel, j < size: a low-discrepancy spread over the whole tensor
    # with no period a conv weight's layout could alias with (a plain stride could keep
    # hitting the same kernel tap), deterministic and free of RNG state.
    j = torch.arange(size, dtype=torch.float64, device=device)
    return torch.clamp((torch.frac(j * 0.6180339887498949) * numel).to(torch.int64), max=numel - 1)


_SAMPLES: dict = {}


def _sample_positions(numel: int, size: int, device) -> Tensor:
    key = (numel, size, str(device))
    pos = _SAMPLES.get(key)
    if pos is None:
        if len(_SAMPLES) >= 256:  # a bounded cache: models have a few dozen distinct sizes
            _SAMPLES.clear()
        pos = _SAMPLES[key] = _weyl_sample(numel, size, device)
    return pos


#: The key of +inf: every key above it is a NaN's.
_INF_KEY = 0x7F800000


def _candidate_mask(x: Tensor, t: int) -> Tensor:
    # ``key(x) >= t`` as bool [n]. For fp32 on a CPU without writing the keys: t is at most
    # inf's key, so it is the key of a float tf and key(x) >= t  <=>  |x| >= tf, or x is NaN
    # (a NaN's key is above every other): three NumPy compares, no n-element int32 pass.
    if numpy_comparable(x) and x.dtype == torch.float32 and t <= _INF_KEY:
        mask = magnitude_at_least(x, float(np.array(t, dtype=np.int32).view(np.float32)))
        in_place = mask.numpy()  # the same memory
        in_place |= np.isnan(x.numpy())
        return mask
    return at_least(_magnitude_key(x), t)


def _topk_candidates(x: Tensor, k: int) -> Tensor | None:
    """Increasing positions of every element whose key is ``>= t`` for a ``t`` at most the
    k-th largest key, so the top k are among them; None when the search does not pay (or
    fails: fewer than k candidates, then ``t`` was too high and the caller falls back to all
    keys).

    ``t`` is the j-th largest of a sample of s keys, with ``j = p*s + 4*sqrt(p*s) + 2``
    (p = k/n): the sample holds about ``p*s`` keys at or above the k-th largest, with a spread
    of ``sqrt(p*s)``, so ``t`` lies below it except with probability ~1e-5, and about
    ``n*j/s`` (a small multiple of k) elements pass. Exact either way: with at least k
    candidates ``t`` cannot exceed the k-th largest key.
    """
    n = x.numel()
    if n < _TOPK_SEARCH_MIN_NUMEL or k > n * _TOPK_SEARCH_MAX_FRACTION:
        return None
    s = min(n, max(4096, math.ceil(_TOPK_SAMPLE_HITS * n / k)))
    if s > n // 4:
        return None
    hits = k * s / n
    j = min(s, math.ceil(hits + 4.0 * math.sqrt(hits) + 2.0))
    sample = _magnitude_key(x.index_select(0, _sample_positions(n, s, x.device)))
    t = int(torch.topk(sample, j, sorted=False).values.min())  # host read: nothing to wait for
    cand = nonzero_sparse(_candidate_mask(x, t))
    return cand if cand.numel() >= k else None


def topk_indices(x: Tensor, k: int) -> Tensor:
    """O(n): a threshold from a sample of the keys keeps a few times k candidates in one
    compare pass (see :func:`_topk_candidates`; all keys when that does not pay);
    ``torch.topk`` over the candidates' keys finds the k-th largest key ``t``; every candidate
    above ``t`` is kept, and the first ones equal to ``t`` (in index order) fill the rest."""
    n = x.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    cand = _topk_candidates(x, k)
    sub = _magnitude_key(x if cand is None else x.index_select(0, cand))
    kth = torch.topk(sub, k, sorted=False).values.min()
    above = sub > kth
    fill = k - int(above.sum())  # host read: the CPU path has no device to wait for
    ties = nonzero_sparse(sub == kth)[:fill]
    picked = torch.sort(torch.cat([nonzero_sparse(above), ties])).values
    return picked if cand is None else cand.index_select(0, picked)


def sampled_threshold(x: Tensor, ratio: float, sample_idx: Tensor) -> Tensor:
    """``torch.topk`` of the gathered sample's magnitudes."""
    # Negative positions count from the end; index_select after the wrap, not x[idx]
    # (advanced indexing checks and wraps element by element on a CPU, several times slower).
    sample = x.index_select(0, sample_idx.remainder(max(1, x.numel()))).to(torch.float32).abs()
    k = max(1, min(sample.numel(), int(-(-ratio * sample.numel() // 1))))
    return torch.topk(sample, k, sorted=False).values.min().reshape(1)


#: count_above's mask of each tensor, reused by compact_above for the same tensor version and
#: threshold (on a CPU the mask is the priciest pass of DGC's selection; a step asks for the
#: count at encode and the compaction at pack, with nothing written in between).
_ABOVE_MASKS = PerTensorVersion()


def _above_mask(x: Tensor, threshold: Tensor, last_use: bool) -> Tensor:
    bound = float(threshold)  # host read: the CPU path has no device to wait for
    lookup = _ABOVE_MASKS.take if last_use else _ABOVE_MASKS
    return lookup(x, bound, lambda: magnitude_at_least(x.to(torch.float32), bound))


def count_above(x: Tensor, threshold: Tensor) -> Tensor:
    """``count_nonzero`` of the mask, which is kept for :func:`compact_above`."""
    # count_nonzero, not sum: a bool sum widens every element to int64 first; NumPy's counts
    # a CPU bool mask several times faster than torch's.
    mask = _above_mask(x, threshold, last_use=False)
    if mask.device.type == "cpu" and mask.dtype == torch.bool:
        return torch.tensor([int(np.count_nonzero(mask.numpy()))], dtype=torch.int64)
    return torch.count_nonzero(mask).reshape(1)


def compact_above(x: Tensor, threshold: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The positions of :func:`count_above`'s mask (reused when ``x`` was not written since),
    then a gather. Raises when ``count`` is not the number selected."""
    idx = nonzero_sparse(_above_mask(x, threshold, last_use=True))
    if idx.numel() != count:
        raise ValueError(f"count={count} but {idx.numel()} elements pass the threshold")
    return idx.to(torch.int32), x.index_select(0, idx).to(torch.float32)
