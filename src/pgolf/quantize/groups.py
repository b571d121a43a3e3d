"""Per-group layout helpers (#2135's "pergroup" compression): roles across layers, similarity sort.

The integer matrices of one role (every layer's `attn.c_q.weight`, say) look alike, and the rows of
some of them are near-duplicates of each other in a different order. The `grouped` artifact layout
(pgolf.quantize.artifact) therefore stores each role's integers together, column-major, as one stream
that is compressed on its own, and first reorders the rows of chosen roles so that similar rows sit
next to each other:

  similarity_order   greedy nearest-neighbour chaining under L1 distance, starting at row 0: the next
                     row is the unused row closest to the current one (ties: the lowest index). O(n^2 d):
                     2048 x 512 in ~2 s, 4096 x 512 in ~10 s on 2 shared CPU cores; it runs on the
                     device it is given (the quantizer passes its own: the GPU in a run).

The permutation is stored with the artifact (uint16, so at most 65,536 rows) and undone on load.
"""

from __future__ import annotations

import re

import numpy as np
import torch

_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")
MAX_SORT_ROWS = 1 << 16  # the permutation is stored as uint16


def role_and_layer(name: str) -> tuple[str, int]:
    """`blocks.3.attn.c_q.weight` -> ("attn.c_q.weight", 3); anything else -> (name, -1)."""
    m = _LAYER.match(name)
    return (m.group(2), int(m.group(1))) if m else (name, -1)


def role_matches(name: str, roles: tuple[str, ...]) -> bool:
    """Whether `name`'s role is one of `roles`, given without or with the ".weight" suffix."""
    role = role_and_layer(name)[0]
    return any(role == r or role == f"{r}.weight" for r in roles)


def parse_roles(spec: str) -> tuple[str, ...]:
    return tuple(r.strip() for r in spec.split(",") if r.strip())


@torch.no_grad()
def similarity_order(q: torch.Tensor) -> np.ndarray:
    """Row order (uint16) of a greedy nearest-neighbour chain under L1 distance, starting at row 0.

    Exact integer distances (int32 sums), so the order is the same on every device."""
    n = q.shape[0]
    if n > MAX_SORT_ROWS:
        raise ValueError(f"cannot sort {n} rows: the permutation is stored as uint16 (at most {MAX_SORT_ROWS})")
    if n <= 2:
        return np.arange(n, dtype=np.uint16)
    rows = q.reshape(n, -1).to(torch.int16)
    # unused rows live compactly in `pool` (swap-remove), their original indices in `index`; one argmin
    # over distance * 2^16 + original index picks the closest row, the lowest index among ties
    pool = rows[1:].clone()
    index = torch.arange(1, n, device=q.device, dtype=torch.int64)
    order = [0]
    cur = rows[0]
    for size in range(n - 1, 0, -1):
        dist = (pool[:size] - cur).abs().sum(dim=1, dtype=torch.int64)
        j = int(torch.argmin(dist * MAX_SORT_ROWS + index[:size]).item())
        order.append(int(index[j].item()))
        cur = pool[j].clone()
        pool[j], index[j] = pool[size - 1], index[size - 1]
    return np.asarray(order, dtype=np.uint16)


def apply_order(q: torch.Tensor, order: np.ndarray) -> torch.Tensor:
    """Rows of q in `order` (stored form)."""
    return q[torch.from_numpy(order.astype(np.int64))]


def undo_order(stored: torch.Tensor, order: np.ndarray) -> torch.Tensor:
    """The inverse of apply_order: stored[i] = q[order[i]] -> q."""
    idx = torch.from_numpy(order.astype(np.int64))
    if idx.numel() != stored.shape[0] or not torch.equal(torch.sort(idx).values, torch.arange(idx.numel())):
        raise ValueError("row order is not a permutation")
    out = torch.empty_like(stored)
    out[idx] = stored
    return out
