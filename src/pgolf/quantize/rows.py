"""Per-row symmetric integer quantization: row scales (clip search, SDClip, percentile) and RTN.

Every quantized matrix in the artifact is `q * s[:, None]` with `q` an integer in [-qmax, qmax],
`qmax = 2**(bits-1) - 1` (int6: +-31, int8: +-127), and `s` one fp16 scale per output row. Scales are
rounded to fp16 BEFORE the integers are chosen, so the stored pair reproduces exactly the weights
the error was measured on.

Row-scale rules (QuantConfig.row_clip):
  search      try clip = r * max|row| for r in CLIP_RATIOS, keep per row the lowest squared
              reconstruction error (weighted by diag(H) per column when a Hessian is known);
  sdclip      clip = k * std(row) (technique-spec §4.2, "SDClip"), k per role (SDCLIP_K, MLP_/ATTN_/
              EMBED_CLIP_SIGMAS);
  percentile  clip = the p-th percentile of |row| (the baseline's int8 rule, p = embed_clip_percentile).
"""

from __future__ import annotations

import torch

# the clip ratios the per-row search tries (1.0 = no clipping, i.e. scale = max|row| / qmax)
CLIP_RATIOS = (0.70, 0.75, 0.80, 0.85, 0.88, 0.91, 0.94, 0.96, 0.98, 0.99, 1.0)
SCALE_FLOOR = 2.0**-24  # smallest positive fp16 (subnormal); all-zero rows get q = 0


def qmax_for(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def to_fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to the stored fp16 values (floored so that no scale is 0 or inf)."""
    return scale.float().clamp(min=SCALE_FLOOR, max=60000.0).half()


def rtn(w: torch.Tensor, scale16: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest integers (int8 tensor) for rows of `w` with fp16 row scales."""
    q = qmax_for(bits)
    s = scale16.float().unsqueeze(1)
    return torch.clamp(torch.round(w.float() / s), -q, q).to(torch.int8)


def dequant(q: torch.Tensor, scale16: torch.Tensor) -> torch.Tensor:
    """The float32 weights a (q, scale) pair stands for; the one definition used everywhere."""
    return q.float() * scale16.float().unsqueeze(1)


def percentile_abs(w: torch.Tensor, pct: float) -> torch.Tensor:
    """Per-row pct-th percentile of |w| with linear interpolation (works for any row count)."""
    a, _ = torch.sort(w.float().abs(), dim=1)
    n = a.shape[1]
    pos = min(max(pct, 0.0), 100.0) / 100.0 * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return a[:, lo] * (1.0 - frac) + a[:, hi] * frac


def search_scales(w: torch.Tensor, bits: int, col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """fp16 row scales minimising sum_j c_j (w_ij - q_ij s_i)^2 over the clip ratios (c = col_weight or 1)."""
    wf = w.float()
    q = qmax_for(bits)
    rowmax = wf.abs().amax(dim=1)
    cw = None if col_weight is None else col_weight.float().to(wf.device).unsqueeze(0)
    best_err = torch.full_like(rowmax, float("inf"))
    best = to_fp16_scale(rowmax / q)
    for r in CLIP_RATIOS:
        s16 = to_fp16_scale(rowmax * r / q)
        err = (wf - dequant(rtn(wf, s16, bits), s16)).square()
        if cw is not None:
            err = err * cw
        err = err.sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s16, best)
    return best


def sdclip_scales(w: torch.Tensor, bits: int, k: float) -> torch.Tensor:
    """fp16 row scales k * std(row) / qmax, std with Bessel's correction (technique-spec §4.2 step 3).

    With k = 11.5-14 this is usually far beyond the row max: the grid is deliberately coarser than
    max-scaling, so the integers concentrate near 0 and compress well (#1855's trade of precision for
    bytes). An earlier version capped k * std at the row max, which made SDClip max-scaling."""
    wf = w.float()
    std = wf.std(dim=1) if wf.shape[1] > 1 else wf.abs().amax(dim=1)
    return to_fp16_scale(k * std / qmax_for(bits))


def percentile_scales(w: torch.Tensor, bits: int, pct: float) -> torch.Tensor:
    return to_fp16_scale(percentile_abs(w, pct) / qmax_for(bits))


def row_scales(
    w: torch.Tensor,
    bits: int,
    rule: str,
    *,
    sdclip_k: float = 12.85,
    percentile: float = 99.99984,
    col_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    if rule == "search":
        return search_scales(w, bits, col_weight)
    if rule == "sdclip":
        return sdclip_scales(w, bits, sdclip_k)
    if rule == "percentile":
        return percentile_scales(w, bits, percentile)
    raise ValueError(f"unknown row clip rule {rule!r}")


def magnitude_mask(w: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """True = keep. Zeroes the `fraction` smallest |w| of the tensor (ties at the threshold pruned)."""
    if fraction <= 0:
        return None
    a = w.float().abs().flatten()
    k = int(fraction * a.numel())
    if k < 1:
        return None
    threshold = torch.kthvalue(a.cpu(), k).values.to(a.device)
    return w.float().abs() > threshold
