"""The adapter hook: where test-time adapters (per-document LoRA) add to the model's projections.

An adapter is any object with `delta(slot, site, x)`. GPT.forward calls it at every block
application `slot` (0 .. num_slots-1, in the order the blocks run; a physical block applied twice
has two slots) for each site below, with that site's input `x`, and adds the returned tensor (or
nothing, for None) to the site's output. The LM head is slot -1. The model never owns adapter
weights, so the artifact and the trained model are unchanged by anything registered here.

    site   input x                               added to
    q      normalized attention input u (B,T,d)  c_q(u)      (B, T, H·D)
    k      u                                     c_k(u)      (B, T, KV·D)
    v      u                                     c_v(u)      (B, T, KV·D)
    o      u                                     the attention output, after proj (B, T, d)
    mlp    normalized MLP input (B, T, d)        the MLP output, before the branch scale (B, T, d)
    head   final normed hidden state (B, T, d)   the logits before the softcap (B, T, V)
"""

from __future__ import annotations

from typing import Protocol

import torch

SITES = ("q", "k", "v", "o", "mlp", "head")
HEAD_SLOT = -1


class Adapter(Protocol):
    def delta(self, slot: int, site: str, x: torch.Tensor) -> torch.Tensor | None: ...


def add_delta(out: torch.Tensor, adapter: Adapter | None, slot: int, site: str, x: torch.Tensor) -> torch.Tensor:
    """out + adapter.delta(slot, site, x), or out unchanged when there is no adapter or no delta."""
    if adapter is None:
        return out
    delta = adapter.delta(slot, site, x)
    return out if delta is None else out + delta.to(out.dtype)
