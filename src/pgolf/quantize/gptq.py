"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Algorithm 1) for one weight matrix with fixed per-row scales.

For a linear layer y = x W^T with calibration Hessian H = E[x^T x] (columns x columns), GPTQ quantizes
the columns of W one at a time and spreads each column's rounding error over the columns not yet
quantized, so that the layer OUTPUT error tr(E H E^T) stays small rather than the weight error.

Steps, as implemented below:
1. dead columns (H_jj = 0: the input never fires) get H_jj = 1 and W[:, j] = 0;
2. act-order (optional): columns sorted by descending H_jj, undone at the end;
3. damping: H += damp * mean(diag H) * I (escalated x10 up to 3 times if Cholesky fails);
4. H^-1 via Cholesky, then U = the UPPER Cholesky factor of H^-1. Row i of U (scaled by 1/U_ii)
   is the update direction for column i given that columns < i are already fixed, i.e. it carries
   the downdate of the inverse after every quantized column. Using rows of plain H^-1 instead (PR #490,
   technique-spec §4.1) is only right for the first column of each block.
5. blocks of `block_size` columns: inside a block every column update is applied immediately to the
   block; the accumulated block error is applied to all later columns once per block (lazy batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgolf.quantize.rows import qmax_for


@dataclass
class GPTQOutput:
    q: torch.Tensor  # int8 (rows, cols), values in [-qmax, qmax]
    damp: float  # the damping fraction finally used
    dead_columns: int


def _upper_inverse_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """U with U^T U = (H + lambda I)^-1, U upper triangular; lambda = damp * mean diag, escalated on failure."""
    mean_diag = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    frac = damp
    for _ in range(4):
        hd = h + (frac * mean_diag) * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u, frac
        frac = max(frac * 10.0, 1e-4)
    raise torch.linalg.LinAlgError(f"Hessian is not positive definite even with damping {frac / 10:g}")


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    scale16: torch.Tensor,
    bits: int,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    keep: torch.Tensor | None = None,
    hi_cols: torch.Tensor | None = None,
    hi_scale16: torch.Tensor | None = None,
    hi_bits: int = 8,
) -> GPTQOutput:
    """Integers q (int8) for W (rows x cols) under fixed fp16 row scales, minimising the output error.

    `keep` (bool, same shape as W) forces q = 0 where False (magnitude pruning), with the error of
    the zeroed weights compensated like any rounding error. `hi_cols` (bool, one per column) marks
    columns quantized at `hi_bits` with the row scales `hi_scale16` inside the same solve (AWQ-lite):
    their rounding error is spread over the later columns like any other.
    """
    rows, cols = w.shape
    if h.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match {cols} input columns")
    device = w.device
    qm = qmax_for(bits)
    W = w.detach().float().clone()
    H = h.detach().to(device=device, dtype=torch.float64).clone()
    K = None if keep is None else keep.to(device).clone()

    dead = H.diagonal() == 0
    n_dead = int(dead.sum())
    if n_dead:
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

    hi = None if hi_cols is None or not bool(hi_cols.any()) else hi_cols.to(device).clone()
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        if K is not None:
            K = K[:, perm]
        if hi is not None:
            hi = hi[perm]

    s = scale16.float().to(device)
    s_hi = None if hi is None else hi_scale16.float().to(device)
    qm_hi = qmax_for(hi_bits)
    if not bool((H - torch.diag(H.diagonal())).any()):
        # diagonal H: no column's error can move to another, GPTQ is exact rounding (and skips the
        # Cholesky factorizations, seconds each at 2048 columns on a CPU)
        q = torch.clamp(torch.round(W / s.unsqueeze(1)), -qm, qm)
        if hi is not None:
            q[:, hi] = torch.clamp(torch.round(W[:, hi] / s_hi.unsqueeze(1)), -qm_hi, qm_hi)
        if K is not None:
            q = q * K
        Q = q.to(torch.int8)
        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        return GPTQOutput(q=Q, damp=damp, dead_columns=n_dead)

    U64, used = _upper_inverse_factor(H, damp)
    U = U64.float()
    del H, U64

    hi_list = None if hi is None else hi.tolist()
    Q = torch.zeros(rows, cols, dtype=torch.int8, device=device)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1 = W[:, b0:b1].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = W1[:, i]
            sc, m = (s_hi, qm_hi) if hi_list is not None and hi_list[b0 + i] else (s, qm)
            q = torch.clamp(torch.round(col / sc), -m, m)
            if K is not None:
                q = q * K[:, b0 + i]
            Q[:, b0 + i] = q.to(torch.int8)
            err = (col - q * sc) / U1[i, i]
            W1[:, i + 1 :] -= err.unsqueeze(1) * U1[i, i + 1 :].unsqueeze(0)
            E1[:, i] = err
        if b1 < cols:
            W[:, b1:] -= E1 @ U[b0:b1, b1:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GPTQOutput(q=Q, damp=used, dead_columns=n_dead)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Relative layer-output error tr(E H E^T) / tr(W H W^T) with E = W - W_hat (H = E[x^T x])."""
    e = (w.float() - w_hat.float()).double()
    wd = w.float().double()
    hd = h.double().to(e.device)
    num = ((e @ hd) * e).sum()
    den = ((wd @ hd) * wd).sum()
    return float(num / den) if float(den) > 0 else 0.0
