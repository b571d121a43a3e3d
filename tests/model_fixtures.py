"""Shared model-test helpers: a small every-feature config, perturbed models, token batches."""

from __future__ import annotations

from dataclasses import replace

import torch

from pgolf.config import PRESETS, ModelConfig
from pgolf.model import BOS_ID, GPT, build_model

# every feature on, at a size that runs in milliseconds: head dim 16, partial RoPE 8 of 16
SMALL = replace(
    PRESETS["debug"]().model,
    vocab_size=64, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
    bigram_buckets=32, bigram_dim=8, xsa_last_n=1, rope_dims=8, ln_scale=True,
    value_residual=True, gated_attention=True, smear_gate=True,
)


def perturbed(cfg: ModelConfig, seed: int = 0) -> GPT:
    """An fp32 CPU model with noise on every parameter, so zero-init paths (proj, gate W, bigram table) act."""
    torch.manual_seed(seed)
    model = build_model(cfg, "cpu")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def tokens(batch: int = 2, seq: int = 24, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    idx = torch.randint(2, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    idx[:, 0] = BOS_ID
    return idx
