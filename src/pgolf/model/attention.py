"""Attention: the causal kernel (FlashAttention 3 on CUDA when importable, else PyTorch SDPA) and
the block's CausalSelfAttention module.

The kernel choice is made once per (config, device) by `attention_backend_in_use`, which the model calls
and `environment.json` records. Asking for "fa3" where it cannot run is an error, never a silent
fallback (technique-spec §7.1 item 13); "auto" falls back to SDPA and logs that once.

Both kernels take q (B, T, H, D) and k, v (B, T, KV, D) with H a multiple of KV (grouped-query
attention) and return (B, T, H, D).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgolf.config import ModelConfig
from pgolf.errors import ConfigError
from pgolf.model.adapters import Adapter, add_delta
from pgolf.model.layers import CastedLinear, apply_rotary, rms_norm

log = logging.getLogger(__name__)

FA3_INSTALL_HINT = "install the flash_attn_3 wheel (flash_attn_interface) or set ATTENTION_BACKEND=sdpa"

_fa3_func: Callable | None = None
_fa3_import_error: str | None = None
_logged_fallback = False


def _load_fa3() -> Callable | None:
    """flash_attn_interface.flash_attn_func, imported once; None when the wheel is missing."""
    global _fa3_func, _fa3_import_error
    if _fa3_func is None and _fa3_import_error is None:
        try:
            from flash_attn_interface import flash_attn_func  # type: ignore[import-not-found]

            _fa3_func = flash_attn_func
        except Exception as exc:  # ImportError, or a wheel built for another torch/CUDA
            _fa3_import_error = f"{type(exc).__name__}: {exc}"
    return _fa3_func


def attention_backend_in_use(backend: str, device: torch.device | str) -> str:
    """'fa3' or 'sdpa' for ATTENTION_BACKEND=`backend` on `device`; ConfigError if fa3 cannot run.

    `backend` may also be a ModelConfig (its attention_backend field is read).
    """
    global _logged_fallback
    backend = getattr(backend, "attention_backend", backend)
    is_cuda = torch.device(device).type == "cuda"
    if backend == "sdpa":
        return "sdpa"
    if backend not in ("auto", "fa3"):
        raise ConfigError(f"ATTENTION_BACKEND={backend!r} is not one of auto|fa3|sdpa")
    fa3 = _load_fa3() if is_cuda else None
    if fa3 is not None:
        return "fa3"
    why = "the device is not CUDA" if not is_cuda else f"flash_attn_interface failed to import ({_fa3_import_error})"
    if backend == "fa3":
        raise ConfigError(f"ATTENTION_BACKEND=fa3 but {why}; {FA3_INSTALL_HINT}")
    if is_cuda and not _logged_fallback:  # on CPU SDPA is the expected path, not a fallback
        log.warning("attention: FlashAttention 3 unavailable (%s); using PyTorch SDPA", why)
        _logged_fallback = True
    return "sdpa"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """softmax(q kᵀ / √D + causal mask) v for q (B, T, H, D), k/v (B, T, KV, D) -> (B, T, H, D)."""
    if backend == "fa3":
        fa3 = _load_fa3()
        assert fa3 is not None, "attention_backend_in_use() must be called before using fa3"
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = fa3(q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
        out = out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
        return out.to(q.dtype)
    # SDPA wants heads before time; enable_gqa broadcasts the KV heads over their query groups
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
        enable_gqa=k.size(2) != q.size(2),
    )  # (B, H, T, D)
    return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    """GQA attention with RMS-normed q/k, q gain, RoPE, Value Residual, XSA and a per-head gate."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d, h, kv, hd = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.c_q = CastedLinear(d, h * hd, qat_bits=cfg.qat_bits)
        self.c_k = CastedLinear(d, kv * hd, qat_bits=cfg.qat_bits)
        self.c_v = CastedLinear(d, kv * hd, qat_bits=cfg.qat_bits)
        self.proj = CastedLinear(h * hd, d, qat_bits=cfg.qat_bits, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((h,), cfg.qk_gain_init))
        # Value Residual: layers >= 1 blend layer 0's raw V in, v <- l0 * v0 + l1 * v
        self.vr_lambda = nn.Parameter(torch.tensor([0.5, 0.5])) if cfg.value_residual and layer > 0 else None
        # XSA: remove from each head's output its component along the token's own value vector
        self.xsa = layer >= cfg.num_layers - cfg.xsa_last_n
        # Gated attention: y_h <- sigmoid(W u + b)_h * y_h, W zero and b = 4 (gate ~0.98 open)
        self.gate = CastedLinear(d, h, bias=True, zero_init=True) if cfg.gated_attention else None
        if self.gate is not None:
            nn.init.constant_(self.gate.bias, cfg.gate_bias_init)

    def forward(self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, v0: torch.Tensor | None,
                backend: str, adapter: Adapter | None = None, slot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """u: normalized block input (B, T, d). Returns (output (B, T, d), this layer's raw V)."""
        B, T, _ = u.shape
        q = add_delta(self.c_q(u), adapter, slot, "q", u).view(B, T, self.num_heads, self.head_dim)
        k = add_delta(self.c_k(u), adapter, slot, "k", u).view(B, T, self.num_kv_heads, self.head_dim)
        v_raw = add_delta(self.c_v(u), adapter, slot, "v", u).view(B, T, self.num_kv_heads, self.head_dim)
        v = v_raw
        if self.vr_lambda is not None and v0 is not None:
            lam = self.vr_lambda.to(v.dtype)
            v = lam[0] * v0 + lam[1] * v
        q, k = rms_norm(q), rms_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = causal_attention(q, k, v, backend)
        if self.xsa:  # v_hat from the pre-VR v of the same position and KV group (a-sub)
            group = self.num_heads // self.num_kv_heads
            y = y.view(B, T, self.num_kv_heads, group, self.head_dim)
            v_hat = F.normalize(v_raw, dim=-1).unsqueeze(3)  # (B, T, KV, 1, D)
            y = (y - (y * v_hat).sum(-1, keepdim=True) * v_hat).view(B, T, self.num_heads, self.head_dim)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(u)).unsqueeze(-1)
        out = self.proj(y.reshape(B, T, self.num_heads * self.head_dim))
        return add_delta(out, adapter, slot, "o", u), v_raw
