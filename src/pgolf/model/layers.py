"""The model's leaves: RMSNorm, fake quantization, the casting linear layer and rotary embeddings.

Everything here is shape-agnostic and knows nothing of blocks or the GPT; a new kind of linear
(a LoRA-adapted CastedLinear, say) belongs here, beside the one the blocks use.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgolf.config import ModelConfig


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim, no learned weight (the seed has none anywhere)."""
    return F.rms_norm(x, (x.size(-1),))


class RMSNorm(nn.Module):
    """`rms_norm` as a module, so a hook can see its output (the quantizer's EMBED_GPTQ hooks `final_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x)


def fake_quant_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row symmetric quantize-dequantize: s = max|row| / (2^(bits-1) - 1), q in [-2^(bits-1), 2^(bits-1) - 1]."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.detach().abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)
    return torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale


class CastedLinear(nn.Linear):
    """A linear (bias-free by default) whose fp32 weight is cast to the input dtype (bf16 under autocast).

    With `qat_bits` > 0, `qat_on` (a plain bool, not saved in the state dict) turns on straight-through
    fake quantization: w_eff = w + (fake_quant(w) - w).detach(). torch.compile guards on the bool, so
    flipping it switches to a second graph with the fake-quant traced in (spec §7.1 item 7: never
    frozen at trace time), and a run that never turns QAT on never traces it (pgolf.model.compiled).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 qat_bits: int = 0, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.qat_bits = qat_bits
        self.zero_init = zero_init  # output projections start at zero (read by GPT._init_weights)
        self.qat_on = False  # set through GPT.set_qat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.qat_bits and self.qat_on:
            w = w + (fake_quant_rows(w, self.qat_bits) - w).detach()
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w.to(x.dtype), bias)


class Rotary(nn.Module):
    """RoPE tables for the first `rope_dims` dims of each head (0 = all), split-half pairing.

    With rope_ntk_ref_len > 0 and T above it, the base is NTK-rescaled to base·(T/ref)^(d/(d-2)):
    the seed always trains and scores 2048-token windows with ref 1024, i.e. base 1e4·2^(64/62).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dims = cfg.rope_dims or cfg.head_dim
        self.base = cfg.rope_base
        self.ntk_ref_len = cfg.rope_ntk_ref_len

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.base
        if self.ntk_ref_len and seq_len > self.ntk_ref_len and self.dims > 2:
            base = base * (seq_len / self.ntk_ref_len) ** (self.dims / (self.dims - 2))
        inv_freq = 1.0 / base ** (torch.arange(0, self.dims, 2, device=device, dtype=torch.float32) / self.dims)
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
        return freqs.cos(), freqs.sin()  # (T, dims/2) each


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) of the first d = 2·cos.size(-1) dims of x (B, T, H, D)."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos, rest), dim=-1)
