"""Periodic validation during training: mean NLL and exact val_bpb on non-overlapping rows.

The val stream (every val shard, concatenated) is cut to n_rows * seq_len + 1 tokens; row j scores
targets j*L+1 .. (j+1)*L, each row starting cold (spec §1.6, "non-overlapping rows"). Rows are split
contiguously over ranks; every forward gets the same number of rows (a rank's short last batch is
padded with row copies whose NLL is dropped), so a compiled `nll_fn` needs one graph. NLL, target
and byte sums are float64 and all-reduced, then
bpb = sum NLL / (ln 2 * sum bytes) (pgolf.data.bpb). This is the diagnostic upstream prints as
`val_loss`/`val_bpb` during training; the scored number comes from `pgolf evaluate`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pgolf import dist
from pgolf.data.bpb import bits_per_byte, val_target_bytes
from pgolf.data.loader import load_val_tokens
from pgolf.errors import DataError


@dataclass(frozen=True)
class ValData:
    tokens: np.ndarray  # int64, n_rows * seq_len + 1
    target_bytes: np.ndarray  # int32, n_rows * seq_len (bytes of tokens[1:])
    seq_len: int

    @property
    def n_rows(self) -> int:
        return (self.tokens.size - 1) // self.seq_len


def load_val(data_dir: str, tokenizer_path: str | None, vocab_size: int, seq_len: int) -> ValData:
    tokens = load_val_tokens(data_dir, vocab_size)
    n_rows = (tokens.size - 1) // seq_len
    if n_rows < 1:
        raise DataError(f"{data_dir}: {tokens.size} val tokens make no full row of TRAIN_SEQ_LEN={seq_len}")
    byte_counts = val_target_bytes(data_dir, tokens, tokenizer_path)
    keep = n_rows * seq_len
    return ValData(tokens=tokens[: keep + 1], target_bytes=np.asarray(byte_counts[:keep]), seq_len=seq_len)


@torch.no_grad()
def evaluate_rows(
    nll_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    val: ValData,
    device: torch.device,
    rank: int,
    world_size: int,
    batch_tokens: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    host_tokens: torch.Tensor | None = None,
) -> tuple[float, float, int, int]:
    """(val_loss, val_bpb, targets, bytes) over all ranks; `nll_fn(x, y)` returns (B, T) NLL.

    `host_tokens`: val.tokens as a (pinned) tensor, so each batch's copy to the GPU does not block."""
    L = val.seq_len
    start, end = val.n_rows * rank // world_size, val.n_rows * (rank + 1) // world_size
    rows_per_batch = max(1, min(batch_tokens // (world_size * L), end - start))
    tokens = torch.from_numpy(val.tokens) if host_tokens is None else host_tokens
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    byte_sum = 0
    for r0 in range(start, end, rows_per_batch):
        r1 = min(r0 + rows_per_batch, end)
        chunk = tokens[r0 * L : r1 * L + 1].to(device, non_blocking=True)
        x, y = chunk[:-1].view(-1, L), chunk[1:].view(-1, L)
        if r1 - r0 < rows_per_batch:  # the short last batch: pad with copies of its first row
            fill = rows_per_batch - (r1 - r0)
            x, y = torch.cat([x, x[:1].expand(fill, L)]), torch.cat([y, y[:1].expand(fill, L)])
        with autocast():
            nll = nll_fn(x, y)[: r1 - r0]
        nll_sum += nll.double().sum()
        byte_sum += int(val.target_bytes[r0 * L : r1 * L].sum(dtype=np.int64))
    sums = torch.stack([
        nll_sum,
        torch.tensor(float((end - start) * L), dtype=torch.float64, device=device),
        torch.tensor(float(byte_sum), dtype=torch.float64, device=device),
    ])
    dist.all_reduce_(sums)
    total_nll, targets, n_bytes = sums.tolist()
    return total_nll / targets, bits_per_byte(total_nll, n_bytes), int(targets), int(n_bytes)
