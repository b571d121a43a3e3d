"""The input path before the first block: BigramHash (a hashed previous-token embedding) and
SmearGate (a per-channel blend with the previous position), both optionally BOS-masked, and
#1855's BOS-fixed SmearGate (BosSmearGate: a scalar, token-gated add of the previous raw embedding).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgolf.config import ModelConfig
from pgolf.model.layers import CastedLinear

BOS_ID = 1  # the sp1024 / CaseOps tokenizers' BOS id; every document starts with it (spec §1.1)


def bigram_hash(idx: torch.Tensor, buckets: int, bos_mask: bool) -> torch.Tensor:
    """Bucket of (previous token, token): (36313·t_i XOR 27191·t_{i-1}) mod (buckets - 1).

    Position 0 gets the reserved bucket buckets - 1. With `bos_mask` every BOS position does too, so a
    document's first position never sees the previous document's last token (the BigramHash half of
    the BOS fix; PR #490 hashes across the boundary).
    """
    idx = idx.long()
    prev = F.pad(idx[:, :-1], (1, 0))
    h = torch.bitwise_xor(36313 * idx, 27191 * prev).remainder(buckets - 1)
    reserved = idx == BOS_ID if bos_mask else torch.zeros_like(idx, dtype=torch.bool)
    reserved[:, 0] = True
    return torch.where(reserved, torch.full_like(h, buckets - 1), h)


class BigramHash(nn.Module):
    """e += scale · proj(table[hash(t_{i-1}, t_i)]); zero table, scale init 0.05.

    The projection bigram_dim -> model_dim exists when the widths differ (BIGRAM_PROJ=always: at every
    width). It is built zero, as in PR #490, and only an orthogonal init (GPT._init_weights) makes it
    non-zero: left at zero, neither it nor the zero table ever gets a gradient.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.buckets, self.bos_mask = cfg.bigram_buckets, cfg.bos_mask
        self.table = nn.Embedding(cfg.bigram_buckets, cfg.bigram_dim)
        needed = cfg.bigram_proj == "always" or cfg.bigram_dim != cfg.model_dim
        self.proj = CastedLinear(cfg.bigram_dim, cfg.model_dim) if needed else None
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)  # after nn.Linear's own draw: the RNG stream stays the PR's
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.table(bigram_hash(idx, self.buckets, self.bos_mask))
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(h.dtype)


class SmearGate(nn.Module):
    """x_t <- (1 - σ(g)) x_t + σ(g) x_{t-1} per channel, g init 0.

    Without the BOS mask (PR #490) x_{-1} = 0, so position 0 is scaled by 1 - σ(g), and a BOS takes in
    the previous document's last position. With it, position 0 and every BOS are left unmixed.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bos_mask = cfg.bos_mask
        self.gate = nn.Parameter(torch.zeros(cfg.model_dim))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        if not self.bos_mask:
            return (1 - g) * x + g * prev
        keep = (idx != BOS_ID).unsqueeze(-1).to(x.dtype)  # no mixing into a document start
        keep[:, 0] = 0
        return x + keep * g * (prev - x)


class BosSmearGate(nn.Module):
    """PR #1855's SmearGate (spec §2.1 (b)), on raw embeddings before the RMSNorm:

        x_t <- x_t + lam * sigmoid(w . x_t[:window]) * x_{t-1} * 1[tok_t != BOS]

    lam (1) and w (window) start at zero, so the gate starts closed (lam = 0). Position 0 has no
    previous position; a BOS never takes in the previous document's last token (spec §7.1 item 8).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.window = cfg.gate_window
        self.gate_w = nn.Parameter(torch.zeros(cfg.gate_window))
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(x[..., : self.window] @ self.gate_w.to(x.dtype)).unsqueeze(-1)  # (B, T, 1)
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))  # x_{t-1}, zero at position 0
        keep = (idx != BOS_ID).unsqueeze(-1).to(x.dtype)
        return x + self.lam.to(x.dtype) * g * prev * keep
