"""Attention: the causal kernel (FlashAttention 3 on CUDA when importable, else PyTorch SDPA) and
the block's CausalSelfAttention module.

The kernel choice is made once per (config, device) by `attention_backend_in_use`, which the model calls
and `environment.json` records. Asking for "fa3" where it cannot run is an error, never a silent
fallback (technique-spec §7.1 item 13); "auto" falls back to SDPA and logs that once.

Both kernels take q (B, T, H, D) and k, v (B, T, KV, D) with H a multiple of KV (grouped-query
attention) and return (B, T, H, D).

Document isolation (DOC_ISOLATION, #1855's packed rows): a document starts at every BOS, and no query
attends to a key of an earlier document in the same row. `doc_context` turns the tokens into what the
kernel needs, with static shapes so it traces into one graph: a (B, 1, T, T) block-diagonal causal
mask for SDPA, or FA3 varlen's `cu_seqlens` (every row cut at its BOS positions, padded with empty
segments to DOC_SEGMENTS_PER_ROW per row).
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
from pgolf.model.inputs import BOS_ID
from pgolf.model.layers import CastedLinear, apply_rotary, rms_norm

log = logging.getLogger(__name__)

FA3_INSTALL_HINT = "install the flash_attn_3 wheel (flash_attn_interface) or set ATTENTION_BACKEND=sdpa"

# segments per packed row in FA3 varlen's cu_seqlens (a static size keeps one compiled graph); a row with
# more documents than this merges its last ones into one segment. FineWeb documents average ~1k tokens,
# so a 2048-token row holds a handful.
DOC_SEGMENTS_PER_ROW = 64

_fa3_func: Callable | None = None
_fa3_varlen_func: Callable | None = None
_fa3_import_error: str | None = None
_logged_fallback = False


def _load_fa3() -> Callable | None:
    """flash_attn_interface.flash_attn_func, imported once; None when the wheel is missing."""
    global _fa3_func, _fa3_varlen_func, _fa3_import_error
    if _fa3_func is None and _fa3_import_error is None:
        try:
            from flash_attn_interface import flash_attn_func, flash_attn_varlen_func  # type: ignore[import-not-found]

            _fa3_func, _fa3_varlen_func = flash_attn_func, flash_attn_varlen_func
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


def doc_mask(idx: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: query t may attend key s iff s <= t and no BOS lies in (s, t]."""
    doc = torch.cumsum((idx == BOS_ID).to(torch.int32), dim=1)  # document number of every position
    T = idx.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal).unsqueeze(1)


def cu_seqlens_from_tokens(idx: torch.Tensor, per_row: int = DOC_SEGMENTS_PER_ROW) -> torch.Tensor:
    """FA3 varlen boundaries of the flattened (B*T) rows: int32 (B*per_row + 1,), non-decreasing.

    Each row starts a segment at its first position and at every BOS; its starts are sorted and padded
    with the row's end (empty segments) to `per_row` entries, so the shape depends on (B, T) only."""
    B, T = idx.shape
    pos = torch.arange(T, device=idx.device).expand(B, T)
    starts = (idx == BOS_ID) | (pos == 0)
    cand = torch.where(starts, pos, torch.full_like(pos, T))
    k = min(per_row, T)
    first = torch.sort(cand, dim=1).values[:, :k] + T * torch.arange(B, device=idx.device)[:, None]
    end = torch.full((1,), B * T, dtype=first.dtype, device=idx.device)
    return torch.cat((first.reshape(-1), end)).to(torch.int32)


def doc_context(idx: torch.Tensor, backend: str) -> torch.Tensor:
    """What `causal_attention` needs to keep documents apart on `backend`: cu_seqlens (fa3) or a mask."""
    return cu_seqlens_from_tokens(idx) if backend == "fa3" else doc_mask(idx)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
                     docs: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √D + causal mask) v for q (B, T, H, D), k/v (B, T, KV, D) -> (B, T, H, D).

    `docs` (from `doc_context`): also mask every key of an earlier document in the row."""
    if backend == "fa3":
        fa3 = _load_fa3()
        assert fa3 is not None, "attention_backend_in_use() must be called before using fa3"
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        if docs is None:
            out = fa3(q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
        else:  # packed: the rows flattened to one sequence of B*T tokens, cut at cu_seqlens
            B, T = q.shape[:2]
            flat = [t.reshape(B * T, *t.shape[2:]).to(dtype) for t in (q, k, v)]
            out = _fa3_varlen_func(*flat, cu_seqlens_q=docs, cu_seqlens_k=docs, max_seqlen_q=T,  # type: ignore[misc]
                                   max_seqlen_k=T, causal=True)
        out = out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
        return out.reshape(q.shape).to(q.dtype)
    # SDPA wants heads before time; enable_gqa broadcasts the KV heads over their query groups
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=docs, is_causal=docs is None,
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
        # SparseAttnGate (#1855): y_h <- sigmoid(0.5 * w_h . u[:window]) * y_h, w zero (gate 0.5 at init)
        self.gate_window = cfg.gate_window
        self.gate_w = nn.Parameter(torch.zeros(h, cfg.gate_window)) if cfg.sparse_attn_gate else None

    def forward(self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, v0: torch.Tensor | None,
                backend: str, adapter: Adapter | None = None, slot: int = 0,
                docs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
        y = causal_attention(q, k, v, backend, docs)
        if self.xsa:  # v_hat from the pre-VR v of the same position and KV group (a-sub)
            group = self.num_heads // self.num_kv_heads
            y = y.view(B, T, self.num_kv_heads, group, self.head_dim)
            v_hat = F.normalize(v_raw, dim=-1).unsqueeze(3)  # (B, T, KV, 1, D)
            y = (y - (y * v_hat).sum(-1, keepdim=True) * v_hat).view(B, T, self.num_heads, self.head_dim)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(u)).unsqueeze(-1)
        if self.gate_w is not None:
            y = y * torch.sigmoid(0.5 * F.linear(u[..., : self.gate_window], self.gate_w.to(u.dtype))).unsqueeze(-1)
        out = self.proj(y.reshape(B, T, self.num_heads * self.head_dim))
        return add_delta(out, adapter, slot, "o", u), v_raw
