"""A transformer block: the MLP and the residual block around attention and MLP.

Every block: x_in = a⊙x + b⊙x0; x = x_in + α⊙Attn(norm(x_in)·s); x = x + β⊙MLP(norm(x)·s).

`Block.parallel` is #1855's two-lane wiring of the same weights (spec §2.3 (b) step 4): attention reads
lane 0 (mixed with x0), the MLP reads lane 1 (so it does not see this block's attention output), and
both outputs are written into both lanes:
    A = α⊙Attn(norm(a⊙lane0 + b⊙x0)·s);  M = β⊙MLP(norm(lane1)·s)
    lane0 <- r0·lane0 + p00·A + p01·M;   lane1 <- r1·lane1 + p10·A + p11·M
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
                slot: int = 0, docs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`slot` is this application's index in the run order (the adapter hook's key)."""
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        y, v_raw = self.attn(rms_norm(x) * self.branch_scale, cos, sin, v0, backend, adapter, slot, docs)
        x = x + self.attn_scale.to(x.dtype) * y
        m_in = rms_norm(x) * self.branch_scale
        x = x + self.mlp_scale.to(x.dtype) * add_delta(self.mlp(m_in), adapter, slot, "mlp", m_in)
        return x, v_raw

    def parallel(self, lane0: torch.Tensor, lane1: torch.Tensor, x0: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, v0: torch.Tensor | None, backend: str, resid: torch.Tensor,
                 post: torch.Tensor, adapter: Adapter | None = None, slot: int = 0,
                 docs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two-lane application (module docstring): resid = (r0, r1), post = [[p00, p01], [p10, p11]]."""
        mix = self.resid_mix.to(lane0.dtype)
        a_in = rms_norm(mix[0] * lane0 + mix[1] * x0) * self.branch_scale
        y, _ = self.attn(a_in, cos, sin, v0, backend, adapter, slot, docs)
        a = self.attn_scale.to(lane0.dtype) * y
        m_in = rms_norm(lane1) * self.branch_scale
        m = self.mlp_scale.to(lane0.dtype) * add_delta(self.mlp(m_in), adapter, slot, "mlp", m_in)
        r, p = resid.to(lane0.dtype), post.to(lane0.dtype)
        return r[0] * lane0 + p[0, 0] * a + p[0, 1] * m, r[1] * lane1 + p[1, 0] * a + p[1, 1] * m
