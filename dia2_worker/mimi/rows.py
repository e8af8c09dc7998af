"""Per-row state updates: a masked call writes the new state of its active rows and leaves the others as they were.

The new state is computed for every row, then selected with `torch.where`, so a call has the same shapes and
kernels whichever rows are active (no host sync, no branch on tensor values: CUDA-graph capturable). `active`
None means every row and skips the selection, so unmasked calls pay nothing for masks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_view(rows: Tensor, like: Tensor) -> Tensor:
    """A bool mask [B] shaped to broadcast over `like`, a batch-first tensor [B, ...]."""
    return rows.view(-1, *(1,) * (like.dim() - 1))


def copy_rows(dest: Tensor, new: Tensor, active: Tensor | None) -> None:
    """`dest.copy_(new)` in the active rows only; `dest` and `new` are batch-first."""
    dest.copy_(new if active is None else torch.where(row_view(active, new), new, dest))


def scatter_rows(dest: Tensor, dim: int, index: Tensor, new: Tensor, active: Tensor | None) -> None:
    """`dest.scatter_(dim, index, new)` in the active rows only (the others write back what `index` holds)."""
    if active is not None:
        new = torch.where(row_view(active, new), new, dest.gather(dim, index))
    dest.scatter_(dim, index, new)
