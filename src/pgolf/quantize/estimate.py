"""Full-size artifact bytes from shapes alone: synthetic weights through the real quantizer and compressor.

    estimate_artifact_bytes(shapes, qcfg) -> dict      shapes: {state-dict name: shape}, e.g. from a
                                                       meta-device model ({k: tuple(v.shape) for k, v in
                                                       GPT(cfg.model) on "meta" .state_dict().items()})

No trained weights exist for a shape before its run, so the body is drawn: every float tensor i.i.d.
from `draw` (standard normal by default; SDClip and clip-search scales are relative to each row's
spread, so only the distribution's shape matters), identity Hessians (GPTQ then rounds like RTN,
while AWQ-lite and LQER still run their real code), then `quantize_state_dict` and `choose` with the
given QuantConfig. To keep it to seconds on a CPU, every 2-D tensor keeps only a fraction of its rows;
the file is built at two or more fractions and the bytes extrapolated to f = 1 (`extrapolate`: fixed
costs such as the JSON header and fp16 passthrough tensors are the intercept, everything per row the
slope, and with three fractions a log term for the coder's learning cost).

What it cannot know: the structure of trained weights (rows that resemble each other, which the
similarity sort exploits; heavier tails) - it estimates the size of the integer alphabet the quantizer
produces, not what a trained model adds. Compare with a measured artifact when one exists.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Callable

import torch

# PR #1855 (technique-spec column (b)): vocab 8192, d 512, 11 layers, MLP 4x, 8 heads / 4 KV heads, sparse
# 8x12 gates, 8 gated U-Net skips, parallel lanes: 35,945,671 parameters (its log).
PR1855_PARAMS = 35_945_671


def pr1855_shapes() -> dict[str, tuple[int, ...]]:
    """State-dict shapes of PR #1855's model, per technique-spec §2.5's parameter formula (names in our
    model's style: blocks.N.attn.c_q.weight, ...)."""
    d, layers, vocab, kv, hidden = 512, 11, 8192, 256, 2048
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (vocab, d)}
    for i in range(layers):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.c_q.weight": (d, d), b + "attn.c_k.weight": (kv, d), b + "attn.c_v.weight": (kv, d),
            b + "attn.proj.weight": (d, d), b + "mlp.fc.weight": (hidden, d), b + "mlp.proj.weight": (d, hidden),
            b + "attn.q_gain": (8,), b + "attn_scale": (d,), b + "mlp_scale": (d,), b + "resid_mix": (2, d),
            b + "attn.gate_w": (8, 12),
        })
    shapes.update({"skip_weights": (8, d), "skip_gates": (8, d), "lane_resid_lambda": (layers, 2),
                   "lane_post_lambda": (layers, 2, 2), "smear.gate_w": (12,), "smear.lam": (1,)})
    return shapes


def gaussian(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen)


def synthetic_state(shapes: dict[str, tuple[int, ...]], row_fraction: float = 1.0, seed: int = 0,
                    draw: Callable[[tuple[int, ...], torch.Generator], torch.Tensor] = gaussian,
                    min_numel: int = 0) -> dict[str, torch.Tensor]:
    """fp32 tensors of the given shapes; those of 2+ dims and more than `min_numel` entries keep only
    ceil(rows * row_fraction) rows."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if len(shape) >= 2 and math.prod(shape) > min_numel:
            shape = (max(1, math.ceil(shape[0] * row_fraction)), *shape[1:])
        out[name] = draw(shape, gen).float() * 0.02
    return out


def _artifact_bytes(state, shapes, qcfg, matrix_keys, workers):
    from pgolf.quantize.artifact import choose
    from pgolf.quantize.groups import parse_roles
    from pgolf.quantize.quantizer import quantize_state_dict

    hessians = {n: torch.eye(t.shape[1]) for n, t in state.items()
                if t.ndim == 2 and (n in matrix_keys or n.startswith("tok_emb.")) and math.prod(shapes[n]) > qcfg.passthrough_max_numel}
    entries, _, _ = quantize_state_dict(state, qcfg, matrix_keys, hessians, route_shapes=shapes)
    blob, info = choose(entries, qcfg.compressor, qcfg.q_layout, groups=qcfg.compress_groups,
                        sort_roles=parse_roles(qcfg.sort_rows), workers=workers)
    return len(blob), info


def extrapolate(fractions: list[float], sizes: list[int]) -> tuple[float, dict]:
    """Bytes at f = 1 from sizes measured at row fractions: a + b f with two points; with three or more,
    least squares on a + b f + c ln f (an adaptive coder's cost: entropy per symbol plus a learning
    cost that grows with the log of the length). Returns (bytes, coefficients)."""
    f = torch.tensor(fractions, dtype=torch.float64)
    y = torch.tensor(sizes, dtype=torch.float64)
    cols = [torch.ones_like(f), f] + ([torch.log(f)] if len(fractions) >= 3 else [])
    coef = torch.linalg.lstsq(torch.stack(cols, dim=1), y.unsqueeze(1)).solution.flatten().tolist()
    names = ["fixed", "per_unit_fraction", "log_term"][: len(coef)]
    return coef[0] + coef[1], dict(zip(names, coef))


def estimate_artifact_bytes(shapes: dict[str, tuple[int, ...]], qcfg, matrix_keys: set[str] | None = None, *,
                            fractions: tuple[float, ...] = (1 / 64, 1 / 32), seed: int = 0,
                            draw: Callable[[tuple[int, ...], torch.Generator], torch.Tensor] = gaussian,
                            workers: int | None = None) -> dict:
    """Estimated artifact file bytes (model bytes, no code) of a model with these shapes under `qcfg`.

    `matrix_keys`: the names that take the GPTQ matrix path (default: every 2-D `blocks.*` tensor).
    `fractions`: the row fractions built (two: linear extrapolation, which overestimates by a few
    percent because a coder's cost per row still falls with length; three or more: the log fit).
    Returns params, the bytes measured at each fraction, `model_bytes` (extrapolated to all rows),
    the fit, the choice of layout+compressor at the largest fraction, and seconds."""
    t0 = time.perf_counter()
    if matrix_keys is None:
        matrix_keys = {n for n, s in shapes.items() if n.startswith("blocks.") and len(s) == 2}
    qcfg = replace(qcfg, size_cap_bytes=10**12)
    fractions = tuple(sorted(fractions))
    if len(fractions) < 2 or not 0 < fractions[0] or fractions[-1] > 1:
        raise ValueError(f"fractions {fractions}: give two or more in (0, 1]")
    sizes, info = [], {}
    for f in fractions:
        b, info = _artifact_bytes(synthetic_state(shapes, f, seed, draw, qcfg.passthrough_max_numel), shapes, qcfg,
                                  matrix_keys, workers)
        sizes.append(b)
    total, fit = extrapolate(list(fractions), sizes)
    return {"params": sum(math.prod(s) for s in shapes.values()), "fractions": list(fractions),
            "measured_bytes": sizes, "model_bytes": round(total), "fit": {k: round(v, 1) for k, v in fit.items()},
            "choice": f"{info['layout']}+{info['compressor']}", "candidates_at_largest": info["candidates"],
            "seconds": round(time.perf_counter() - t0, 2)}
