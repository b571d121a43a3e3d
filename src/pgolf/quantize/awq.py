"""AWQ-lite (PR #1908, carried by #1945 and #2135): a few salient column groups at higher precision.

Activation-aware salience of input column j of a weight W (rows x cols) with calibration Hessian
H = E[x^T x]:  act_rms_j * mean_i |W_ij|, where act_rms_j = sqrt(H_jj) (the RMS of input j; our
Hessians are divided by the row count, so their diagonal is the mean square). The columns are cut
into aligned groups of AWQ_LITE_GROUP_SIZE; a group scores the sum of its columns. The
AWQ_LITE_GROUP_TOP_K best groups of the WHOLE model (every GPTQ tensor with a Hessian, narrower
than AWQ_LITE_BITS) are then quantized at AWQ_LITE_BITS with their own row scales inside the same
GPTQ solve (pgolf.quantize.gptq `hi_cols`); the rest of each matrix keeps its width. #1908's
records use one 64-column group at int8 for the whole model.
"""

from __future__ import annotations

import torch


def group_scores(w: torch.Tensor, h: torch.Tensor, group_size: int) -> list[tuple[float, int]]:
    """(score, start column) of every whole group of `group_size` columns of w (rows x cols)."""
    cols = w.shape[1]
    act_rms = h.diagonal().float().clamp(min=0).sqrt().to(w.device)
    salience = act_rms * w.float().abs().mean(dim=0)
    n = cols // group_size
    if n < 1:
        return []
    sums = salience[: n * group_size].reshape(n, group_size).sum(dim=1).tolist()
    return [(float(s), g * group_size) for g, s in enumerate(sums)]


def select_groups(candidates: dict[str, tuple[torch.Tensor, torch.Tensor]], group_size: int,
                  top_k: int) -> dict[str, list[int]]:
    """name -> sorted start columns of the `top_k` most salient groups over all candidate (W, H) pairs.

    Ties go to the lower name, then the lower column, so the choice is deterministic."""
    scored = []
    for name, (w, h) in candidates.items():
        scored += [(-score, name, start) for score, start in group_scores(w, h, group_size)]
    scored.sort()
    chosen: dict[str, list[int]] = {}
    for _, name, start in scored[:top_k]:
        chosen.setdefault(name, []).append(start)
    return {name: sorted(starts) for name, starts in chosen.items()}


def column_mask(cols: int, starts: list[int], group_size: int) -> torch.Tensor:
    mask = torch.zeros(cols, dtype=torch.bool)
    for s in starts:
        mask[s : s + group_size] = True
    return mask
