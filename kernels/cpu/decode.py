"""Dense accumulation of sparse payloads: torch's ``index_add_``."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def scatter_add_(out: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """``out.index_add_`` in index order; raises on an index outside ``[0, n)``."""
    return out.index_add_(0, indices.to(torch.int64), values.to(torch.float32))
