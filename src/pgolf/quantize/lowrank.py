"""Low-rank correction of the quantization error (LQER, as in PR #1855 / technique-spec §4.2 step 4).

For the LOWRANK_TENSORS quantized tensors with the largest ||E||_F, E = W - W_hat (W_hat the realized
quantized weights, AWQ groups included), a truncated SVD gives E ~ A B with A = U_r S_r (rows x r) and
B = V_r^T (r x cols); the artifact stores A and B and the loader adds A @ B. Factor storage
(LOWRANK_PACKING):

  fp16   both factors as IEEE half (2 bytes a value);
  asym   LQER's asymmetric packing: A as INT2 in [-2, 1] with ONE fp16 scale max|A| / 1.5, B as INT4
         in [-8, 7] with an fp16 scale (group max / 7.5) per LOWRANK_GROUP consecutive entries of the
         flattened B (one group per row of B when the group does not divide it). Stored bit-packed
         ("s2"/"s4"): at rank 4 a 2048 x 512 matrix costs 2 KiB + 1 KiB + 64 B instead of 20 KiB.
"""

from __future__ import annotations

import torch

from pgolf.quantize.rows import to_fp16_scale

A_RANGE = (-2, 1)  # INT2, asymmetric: the codes of A are {-2, -1, 0, 1}
B_RANGE = (-8, 7)  # INT4
A_DIVISOR, B_DIVISOR = 1.5, 7.5  # scale = max |x| / divisor


def svd_factors(err: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) float32 with A @ B the best rank-`rank` approximation of err (rows x cols)."""
    u, s, vh = torch.linalg.svd(err.float(), full_matrices=False)
    k = min(rank, s.numel())
    return (u[:, :k] * s[:k]).contiguous(), vh[:k].contiguous()


def pack_asym(a: torch.Tensor, b: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """The artifact parts of LQER's asymmetric packing (int8 tensors holding INT2 / INT4 codes)."""
    sa = to_fp16_scale(a.abs().amax() / A_DIVISOR).reshape(())
    qa = torch.clamp(torch.round(a / sa.float()), *A_RANGE).to(torch.int8)
    g = group if b.numel() % group == 0 else b.shape[1]
    bg = b.reshape(-1, g)
    sb = to_fp16_scale(bg.abs().amax(dim=1) / B_DIVISOR)
    qb = torch.clamp(torch.round(bg / sb.float().unsqueeze(1)), *B_RANGE).to(torch.int8).reshape(b.shape)
    return {"lr_a": qa.cpu().contiguous(), "lr_a_scale": sa.cpu(), "lr_b": qb.cpu().contiguous(),
            "lr_b_scale": sb.cpu().contiguous()}


def pack_fp16(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"lr_a": a.half().cpu().contiguous(), "lr_b": b.half().cpu().contiguous()}


def correction_parts(err: torch.Tensor, rank: int, packing: str, group: int) -> dict[str, torch.Tensor]:
    a, b = svd_factors(err, rank)
    if packing == "asym":
        return pack_asym(a, b, group)
    if packing == "fp16":
        return pack_fp16(a, b)
    raise ValueError(f"unknown low-rank packing {packing!r}")
