"""A transformer block: the MLP and the residual block around attention and MLP.

Every block: x_in = a⊙x + b⊙x0; x = x_in + α⊙Attn(norm(x_in)·s); x = x + β⊙MLP(norm(x)·s).
Another way of wiring a block's residual stream (parallel lanes, say) belongs here, beside Block.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgolf.config import ModelConfig
from pgolf.model.adapters import Adapter, add_delta
from pgolf.model.attention import CausalSelfAttention
from pgolf.model.layers import CastedLinear, rms_norm


class MLP(nn.Module):
    """fc -> ReLU² or LeakyReLU(slope)² -> proj (zero-init)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = CastedLinear(cfg.model_dim, cfg.mlp_hidden, qat_bits=cfg.qat_bits)
        self.proj = CastedLinear(cfg.mlp_hidden, cfg.model_dim, qat_bits=cfg.qat_bits, zero_init=True)
        self.slope = cfg.leaky_relu_slope if cfg.mlp_activation == "leaky_relu2" else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, self.slope) if self.slope else F.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d = cfg.model_dim
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))  # alpha, per channel
        self.mlp_scale = nn.Parameter(torch.ones(d))  # beta, per channel
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))  # (a, b)
        self.branch_scale = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0  # LN scale s_l

    def forward(self, x: torch.Tensor, x0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                v0: torch.Tensor | None, backend: str, adapter: Adapter | None = None,
                slot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """`slot` is this application's index in the run order (the adapter hook's key)."""
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        y, v_raw = self.attn(rms_norm(x) * self.branch_scale, cos, sin, v0, backend, adapter, slot)
        x = x + self.attn_scale.to(x.dtype) * y
        m_in = rms_norm(x) * self.branch_scale
        x = x + self.mlp_scale.to(x.dtype) * add_delta(self.mlp(m_in), adapter, slot, "mlp", m_in)
        return x, v_raw
