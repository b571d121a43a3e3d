"""Causal attention kernels: FlashAttention 3 on CUDA when importable, else PyTorch SDPA.

The choice is made once per (config, device) by `attention_backend_in_use`, which the model calls
and `environment.json` records. Asking for "fa3" where it cannot run is an error, never a silent
fallback (technique-spec §7.1 item 13); "auto" falls back to SDPA and logs that once.

Both kernels take q (B, T, H, D) and k, v (B, T, KV, D) with H a multiple of KV (grouped-query
attention) and return (B, T, H, D).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from pgolf.errors import ConfigError

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
