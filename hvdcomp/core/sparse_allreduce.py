"""Sparse allreduce: the sum of N ranks' top-k selections in O(k) bytes per rank, whatever N.

An allgather of top-k payloads makes every rank receive ``2k (N-1)`` elements (an index and
a value from each other rank), which stops beating a dense ring allreduce at N ~ 1 / density.
Li and Hoefler ("Near-Optimal Sparse Allreduce for Distributed Deep Learning", PPoPP 2022,
Ok-Topk) keep a sparse allreduce within ``6k (N-1)/N`` elements per rank (lower bound
``2k (N-1)/N``): each rank owns a *region* of the index space, the selections are summed
region by region (split and reduce), the owners keep k of the summed entries in all, and
those are allgathered. This module holds the local steps of that exchange for one chain of
tensors; the chain in :mod:`hvdcomp.core.chains` issues its three collectives:

1. **alltoall of counts**: how many of its selected entries each rank sends to each owner
   (int64, per tensor), with its non-finite flag;
2. **alltoall of entries**: each selected ``(index, value)`` to the owner of its region
   (as int32 words: the fp32 value's bits travel unchanged); the owner sums what it received
   in source-rank order, exactly the sum of the selected values at each index;
3. **allgather** of each owner's ``q`` largest summed entries (``q = k/N``, so k in all),
   padded with index -1 where the region had fewer, and its number of candidates.

Per rank: entries sent in step 2 are at most its own k; received about ``k (N-1)/N`` when
the regions are balanced; step 3 receives ``k (N-1)/N`` entries: ``4k (N-1)/N`` elements
received in all, plus ``(T+1)(N-1)`` counts and T candidate numbers per owner (T tensors).

Regions balance themselves: their boundaries (``state["sparse_regions"]``, int64 [N+1],
identical on every rank, checkpointed) start uniform and after every step move so that each
region would have held the same number of candidates (the distinct indices the ranks
selected there, which every owner reports in step 3), assuming candidates spread evenly
within each old region and mixing in 10 % of a uniform split so that no region vanishes.
Ok-Topk recomputes its boundaries from the selected indices every few iterations; here they
follow the last step's, at no extra cost in messages.

Error feedback stays exact: a rank commits (:meth:`SparseSelection.commit`) only those of
its selected entries that the global selection applied; the others stay in its accumulator,
so on every rank ``applied + accumulator == accumulator before + gradient`` and the applied
sum is exactly the sum of what the ranks selected at the kept indices.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import kernels

Tensor = torch.Tensor

#: The state key of a slot's region boundaries.
REGIONS = "sparse_regions"
#: Index of a padding entry in an owner's payload.
PADDING = -1
#: The share of a uniform split mixed into the region boundaries.
UNIFORM_SHARE = 0.1


def initial_regions(numel: int, nranks: int, device) -> Tensor:
    """int64 [N+1]: N near-equal regions of ``[0, numel)``."""
    return torch.tensor([numel * j // nranks for j in range(nranks + 1)], dtype=torch.int64, device=device)


def quota(k: int, nranks: int, owner: int) -> int:
    """Entries owner ``owner`` keeps of a tensor whose k is ``k`` (sum over owners: k)."""
    return k // nranks + int(owner < k % nranks)


def balanced_regions(regions: Tensor, candidates: Tensor, numel: int) -> Tensor:
    """New boundaries (int64 [N+1]) from the old ones and each region's candidate count
    (int [N]): cut where the piecewise-uniform candidate distribution, mixed with
    :data:`UNIFORM_SHARE` of a uniform one, reaches j/N."""
    total = candidates.sum()
    nranks = candidates.numel()
    if numel == 0 or int(total) == 0:
        return regions.clone()
    b = regions.to(torch.float64)
    cum = torch.cat([torch.zeros(1, dtype=torch.float64, device=b.device), candidates.to(torch.float64).cumsum(0)])
    f = (1 - UNIFORM_SHARE) * cum / total.to(torch.float64) + UNIFORM_SHARE * b / numel  # strictly increasing
    targets = torch.arange(nranks + 1, dtype=torch.float64, device=b.device) / nranks
    seg = torch.clamp(torch.searchsorted(f, targets, right=True) - 1, 0, nranks - 1)
    frac = (targets - f[seg]) / (f[seg + 1] - f[seg])
    cuts = torch.round(b[seg] + frac.clamp(0, 1) * (b[seg + 1] - b[seg])).to(torch.int64)
    cuts[0], cuts[-1] = 0, numel
    return torch.cummax(cuts, 0).values


class SparseAllreduce:
    """The local steps of one chain's sparse allreduce (see the module docstring).

    compressors/states/infos: one entry per tensor (:class:`~hvdcomp.compressor.SparseSelection`
    compressors, each state holding :data:`REGIONS`); grads: the tensors' gradients.
    ``select`` runs here (the accumulators take in the gradients); every later method is
    one step of the exchange, in order: :meth:`count_message`, :meth:`read_counts`,
    :meth:`entries_message`, :meth:`owner_message`, :meth:`decode`, :meth:`commit`.
    """

    def __init__(self, compressors: Sequence, states: Sequence[dict], infos: Sequence, grads: Sequence[Tensor],
                 rank: int, nranks: int, step: int):
        self.compressors, self.states, self.infos = list(compressors), list(states), list(infos)
        self.rank, self.nranks = rank, nranks
        self.targets = [c.target_count(i, step) for c, i in zip(compressors, infos)]
        self.selections = [c.select(g, s, i, step) for c, g, s, i in zip(compressors, grads, states, infos)]
        # Owner of each selected entry (regions sorted, indices increasing: owners contiguous).
        self.counts = [torch.bincount(torch.bucketize(idx, s[REGIONS][1:-1], right=True), minlength=nranks)
                       for (idx, _), s in zip(self.selections, states)]
        self.sent: list[list[int]] = []  # [t][owner] entries this rank sends
        self.received: list[list[int]] = []  # [source][t] entries this rank receives
        self.applied: list[Tensor] = []

    def count_message(self, flag: Tensor) -> Tensor:
        """int64 [N * (T+1)]: row c (to rank c) holds the counts for owner c and the flag."""
        rows = torch.stack(self.counts, dim=1) if self.counts else torch.zeros(self.nranks, 0, dtype=torch.int64)
        flags = flag.to(torch.int64).reshape(1, 1).expand(self.nranks, 1)
        return torch.cat([rows.to(torch.int64), flags.to(rows.device)], dim=1).reshape(-1)

    def read_counts(self, received: Tensor) -> bool:
        """Read both count tables to the host (the chain's one read); True when some rank was
        non-finite (every rank learns it here: then nothing more is sent)."""
        t = len(self.counts)
        mine = torch.stack(self.counts, dim=0) if self.counts else torch.zeros(0, self.nranks, dtype=torch.int64)
        both = torch.cat([mine.reshape(-1).to(received.device), received]).tolist()
        self.sent = [both[i * self.nranks:(i + 1) * self.nranks] for i in range(t)]
        rows = [both[t * self.nranks + s * (t + 1):t * self.nranks + (s + 1) * (t + 1)] for s in range(self.nranks)]
        self.received = [row[:t] for row in rows]
        return any(row[t] for row in rows)

    def entries_message(self, dropped: bool) -> tuple[Tensor, list[int], list[int]]:
        """``(int32 words, send splits, receive splits)``: to owner c, per tensor, the indices
        then the values (fp32 bits) of the entries in c's region."""
        if dropped:
            device = self.states[0][REGIONS].device if self.states else None
            return torch.zeros(0, dtype=torch.int32, device=device), [0] * self.nranks, [0] * self.nranks
        pieces = [[] for _ in range(self.nranks)]
        for (idx, vals), sent in zip(self.selections, self.sent):
            for c, (i, v) in enumerate(zip(torch.split(idx, sent), torch.split(vals, sent))):
                pieces[c] += [i.to(torch.int32), v.to(torch.float32).contiguous().view(torch.int32)]
        words = torch.cat([p for c in pieces for p in c])
        send = [2 * sum(sent[c] for sent in self.sent) for c in range(self.nranks)]
        recv = [2 * sum(row) for row in self.received]
        return words, send, recv

    def owner_message(self, received: Tensor) -> Tensor:
        """int32 words: per tensor, this owner's q kept entries (indices, padded with -1, then
        fp32 value bits) and its number of candidates. The sums are taken in source order."""
        out, pos = [], 0
        per_source = []
        for row in self.received:
            parts = []
            for n in row:
                parts.append((received[pos:pos + n].to(torch.int64), received[pos + n:pos + 2 * n].view(torch.float32)))
                pos += 2 * n
            per_source.append(parts)
        for t, k in enumerate(self.targets):
            q = quota(k, self.nranks, self.rank)
            idx = torch.cat([parts[t][0] for parts in per_source])
            keys, inverse = torch.unique(idx, sorted=True, return_inverse=True)
            sums = torch.zeros(keys.numel(), dtype=torch.float32, device=received.device)
            start = 0
            for parts in per_source:  # one source at a time: a fixed order of additions
                n = parts[t][0].numel()
                sums.index_add_(0, inverse[start:start + n], parts[t][1])
                start += n
            # The q largest |sum| (ties to the lower index), in increasing index order.
            kept = kernels.topk_indices(sums, min(q, keys.numel()))
            pad = q - kept.numel()
            index = torch.cat([keys[kept], torch.full((pad,), PADDING, dtype=torch.int64, device=sums.device)])
            value = torch.cat([sums[kept], torch.zeros(pad, dtype=torch.float32, device=sums.device)])
            out += [index.to(torch.int32), value.view(torch.int32),
                    torch.tensor([keys.numel()], dtype=torch.int32, device=sums.device)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int32)

    def lengths(self, dropped: bool) -> list[int]:
        """Words each owner sends in step 3."""
        if dropped:
            return [0] * self.nranks
        return [sum(2 * quota(k, self.nranks, j) + 1 for k in self.targets) for j in range(self.nranks)]

    def decode(self, parts: Sequence[Tensor]) -> list[Tensor]:
        """Every tensor's dense fp32 sum of the kept entries (flat), from the owners' words;
        the regions move towards balance (see the module docstring)."""
        totals, offsets = [], [0] * self.nranks
        for t, (k, info, state) in enumerate(zip(self.targets, self.infos, self.states)):
            idx, vals, cands = [], [], []
            for j, part in enumerate(parts):
                q, o = quota(k, self.nranks, j), offsets[j]
                idx.append(part[o:o + q].to(torch.int64))
                vals.append(part[o + q:o + 2 * q].view(torch.float32))
                cands.append(part[o + 2 * q:o + 2 * q + 1])
                offsets[j] = o + 2 * q + 1
            idx, vals = torch.cat(idx), torch.cat(vals)
            real = idx != PADDING
            applied = idx[real]  # increasing: regions in order, each owner's sorted
            total = torch.zeros(info.numel, dtype=torch.float32, device=vals.device)
            total[applied] = vals[real]
            totals.append(total)
            self.applied.append(applied)
            state[REGIONS] = balanced_regions(state[REGIONS], torch.cat(cands), info.numel)
        return totals

    def commit(self) -> None:
        """Each accumulator gives up the selected entries that were applied."""
        for comp, state, info, (idx, _), applied in zip(self.compressors, self.states, self.infos, self.selections,
                                                        self.applied):
            comp.commit(state, info, idx[torch.isin(idx, applied)])
