"""Batched per-document LoRA for test-time training (technique-spec §5.2), through the model's adapter hook.

One `BatchedLoRA` holds, for a batch of B documents, a rank-r adapter per (slot, site): A (B, r, in) and
B (B, out, r), document i's weights in row i. `delta(slot, site, x)` for x (B, T, in) is

    scale · (x Aᵀ) Bᵀ        (two batched matmuls over the document dimension),  scale = α / r,

so document i's logits depend on document i's weights only, and one optimizer step on the sum of the
documents' losses is B independent steps. Sites are the adapter hook's (model/adapters.py): q, k, v (added
to the projections), o (fed by the attention input, added to the attention output), mlp (fed by the MLP
input, added to its output) and head (slot -1, added to the logits before the cap). #1953 and #2014
dropped q and v (`TTT_LORA_SITES`).

Init as #1855: B = 0 (the adapted model starts as the base model), A ~ U(±1/√in), one draw shared by the
documents of a batch. `reset()` between batches: B ← 0, the optimizer's moments and step counts ← 0, and
A kept as the previous batch left it ("warm-start A", PR #1767) unless `warm_start_a` is off.

`BatchedAdamW`: AdamW (decoupled weight decay) with a per-document step count and a per-step mask, so
documents whose current chunk is their last take no step (their weights, moments and counts stay as they
are). With β1 = 0 (#1855) no first moment is stored.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from pgolf.errors import ConfigError
from pgolf.model.adapters import HEAD_SLOT, SITES


def parse_sites(spec: str) -> tuple[str, ...]:
    sites = tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise ConfigError(f"TTT_LORA_SITES={spec!r}: choose a comma list from {','.join(SITES)}")
    return sites


def site_dims(model: torch.nn.Module, site: str) -> tuple[int, int]:
    """(in, out) of the adapter at `site` for this model (the hook's contract, model/adapters.py)."""
    cfg = model.cfg  # type: ignore[attr-defined]
    d = cfg.model_dim
    out = {"q": cfg.num_heads * cfg.head_dim, "k": cfg.num_kv_heads * cfg.head_dim,
           "v": cfg.num_kv_heads * cfg.head_dim, "o": d, "mlp": d, "head": cfg.vocab_size}[site]
    return d, out


class BatchedLoRA:
    """The adapter object passed as `adapter=` to GPT.forward (or AsymLogitHead.forward)."""

    def __init__(self, model: torch.nn.Module, sites: Sequence[str], *, docs: int, rank: int, alpha: float,
                 warm_start_a: bool = True, seed: int = 0):
        self.docs, self.rank, self.scale = docs, rank, alpha / rank
        self.warm_start_a = warm_start_a
        device = next(model.parameters()).device
        keys = [(slot, s) for slot in range(model.num_slots) for s in sites if s != "head"]  # type: ignore[attr-defined]
        if "head" in sites:
            keys.append((HEAD_SLOT, "head"))
        g = torch.Generator().manual_seed(seed)
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], torch.Tensor] = {}
        self.a_init: dict[tuple[int, str], torch.Tensor] = {}
        for key in keys:
            n_in, n_out = site_dims(model, key[1])
            bound = 1.0 / math.sqrt(n_in)
            init = (torch.rand(rank, n_in, generator=g) * 2 - 1) * bound
            self.a_init[key] = init.to(device)
            self.a[key] = init.to(device).expand(docs, rank, n_in).clone().requires_grad_(True)
            self.b[key] = torch.zeros(docs, n_out, rank, device=device, requires_grad=True)

    def delta(self, slot: int, site: str, x: torch.Tensor) -> torch.Tensor | None:
        key = (slot, site)
        if key not in self.a:
            return None
        a, b = self.a[key], self.b[key]
        h = torch.bmm(x, a.transpose(1, 2).to(x.dtype))  # (B, T, r)
        return torch.bmm(h, b.transpose(1, 2).to(h.dtype)) * self.scale  # (B, T, out)

    def parameters(self) -> list[torch.Tensor]:
        return [t for key in self.a for t in (self.a[key], self.b[key])]

    def num_params_per_doc(self) -> int:
        return sum(t[0].numel() for t in self.parameters())

    @torch.no_grad()
    def reset(self, fresh_a: bool = False) -> None:
        """B ← 0; A ← its initial draw when `fresh_a` or warm start is off, else kept."""
        for key in self.a:
            self.b[key].zero_()
            if fresh_a or not self.warm_start_a:
                self.a[key].copy_(self.a_init[key].expand_as(self.a[key]))


class BatchedAdamW:
    """AdamW over tensors whose dim 0 is the document; `step(mask)` updates only the masked documents."""

    def __init__(self, params: Sequence[torch.Tensor], *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float):
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps, self.wd = lr, betas, eps, weight_decay
        docs = self.params[0].size(0)
        device = self.params[0].device
        self.steps = torch.zeros(docs, dtype=torch.float32, device=device)
        self.v = [torch.zeros_like(p) for p in self.params]
        self.m = [torch.zeros_like(p) for p in self.params] if self.beta1 > 0 else None

    @torch.no_grad()
    def reset(self) -> None:
        self.steps.zero_()
        for t in self.v + (self.m or []):
            t.zero_()

    @torch.no_grad()
    def step(self, mask: torch.Tensor) -> None:
        """One step for the documents where `mask` (B,) is true; the rest are left exactly as they are."""
        self.steps += mask.float()
        shape = (-1,) + (1,) * (self.params[0].dim() - 1)
        keep = ~mask.view(shape)
        t = self.steps.clamp(min=1).view(shape)
        bc1 = 1 - self.beta1 ** t
        bc2 = 1 - self.beta2 ** t
        for i, p in enumerate(self.params):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            v = torch.where(keep, self.v[i], self.beta2 * self.v[i] + (1 - self.beta2) * g * g)
            self.v[i].copy_(v)
            if self.m is not None:
                m = torch.where(keep, self.m[i], self.beta1 * self.m[i] + (1 - self.beta1) * g)
                self.m[i].copy_(m)
            else:
                m = g
            update = p * (self.lr * self.wd) + self.lr * (m / bc1) / ((v / bc2).sqrt() + self.eps)
            p.sub_(torch.where(keep, torch.zeros_like(update), update))
            p.grad = None
