"""Scoring: batched per-token NLL over windows, and the tally that commits scored targets.

`Tally` is the single place where a target becomes "scored". It keeps the float64 sums (NLL, count,
bytes), the optional per-token audit array, and `scored_upto`: the end of the committed prefix of the
stream, which only grows, one chunk at a time. TTT asks the tally before every optimizer step
(`require_scored`), so a step on a target that has not been committed cannot happen silently.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.evaluate.windows import Window

IGNORE = -100  # label of padded positions (F.cross_entropy's default ignore_index)

ModelFn = Callable[[torch.Tensor], torch.Tensor]  # idx (B, T) -> fp32 logits (B, T, V)


class ScoreFirstViolation(AssertionError):
    """A TTT step was about to train on a target whose score was not committed yet (a bug, never data)."""


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the trainer's numerics); plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_batch(tokens: torch.Tensor, spans: Sequence[tuple[int, int]], seq_len: int,
               rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs/labels for spans of target indices: row i = tokens[a:b] -> tokens[a+1:b+1].

    Rows are right-padded to seq_len (input 0, label IGNORE) and the batch to `rows` rows, so a
    compiled forward sees one static shape; a causal model's outputs at real positions do not depend
    on what follows them, so padding never changes a score."""
    n_rows = max(len(spans), rows or 0, 1)
    device = tokens.device
    start = torch.zeros(n_rows, dtype=torch.long)
    length = torch.zeros(n_rows, dtype=torch.long)
    for i, (a, b) in enumerate(spans):
        start[i], length[i] = a, b - a
    start, length = start.to(device), length.to(device)
    col = torch.arange(seq_len, device=device)
    valid = col[None, :] < length[:, None]
    pos = torch.where(valid, start[:, None] + col[None, :], torch.zeros_like(col)[None, :])
    x = torch.where(valid, tokens[pos], 0)
    y = torch.where(valid, tokens[pos + valid.long()], IGNORE)
    return x, y


def token_nll(model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, T) fp32 NLL in nats of labels y under softmax(logits / temperature); 0 at IGNORE labels."""
    logits = model_fn(x).float()
    if temperature != 1.0:
        logits = logits / temperature
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none", ignore_index=IGNORE)
    return nll.view_as(y)


def score_windows(model_fn: ModelFn, tokens: torch.Tensor, windows: Sequence[Window], seq_len: int,
                  batch_seqs: int, temperature: float, pad_rows: bool) -> torch.Tensor:
    """fp32 NLL of the targets scored by `windows`, concatenated in stream order (caller sets no-grad)."""
    out: list[torch.Tensor] = []
    device = tokens.device
    for i in range(0, len(windows), batch_seqs):
        batch = windows[i:i + batch_seqs]
        x, y = make_batch(tokens, [(w.start, w.score_to) for w in batch], seq_len,
                          batch_seqs if pad_rows else None)
        with autocast_for(device):
            nll = token_nll(model_fn, x, y, temperature)
        # flat positions of the scored suffix of each window, row by row (an index, not a mask: no sync)
        keep = np.concatenate([np.arange(r * seq_len + w.score_from - w.start, r * seq_len + w.score_to - w.start)
                               for r, w in enumerate(batch)])
        out.append(nll.flatten()[torch.from_numpy(keep).to(device, non_blocking=True)])
    if not out:
        return torch.zeros(0, dtype=torch.float32, device=device)
    return torch.cat(out)


class Tally:
    """Float64 sums over this rank's scored targets, the audit array, and the committed prefix."""

    def __init__(self, target_bytes: np.ndarray, keep_per_token: bool):
        self.target_bytes = target_bytes
        self.n_targets = int(target_bytes.size)
        self.nll_sum = 0.0
        self.count = 0
        self.byte_sum = 0
        self.per_token = np.zeros(self.n_targets, dtype=np.float32) if keep_per_token else None
        self.scored_upto = 0  # targets [0, scored_upto) are committed on every rank
        self.checks = 0  # optimizer steps whose training targets were verified as committed

    def add(self, lo: int, nll: torch.Tensor) -> None:
        """Add this rank's scores for the targets [lo, lo + len(nll))."""
        hi = lo + int(nll.numel())
        if hi == lo:
            return
        self.nll_sum += float(nll.double().sum())
        self.count += hi - lo
        self.byte_sum += int(self.target_bytes[lo:hi].sum(dtype=np.int64))
        if self.per_token is not None:
            self.per_token[lo:hi] = nll.detach().float().cpu().numpy()

    def commit(self, lo: int, hi: int) -> None:
        """Every rank has scored [lo, hi): extend the committed prefix (chunks commit in order)."""
        if lo != self.scored_upto or hi < lo:
            raise ScoreFirstViolation(f"commit of [{lo}, {hi}) does not extend the scored prefix [0, {self.scored_upto})")
        self.scored_upto = hi

    def require_scored(self, spans: Sequence[tuple[int, int]]) -> None:
        """Raise unless every target of every span (a, b) lies in the committed prefix."""
        for a, b in spans:
            if a < 0 or b > self.scored_upto:
                raise ScoreFirstViolation(
                    f"TTT would train on targets [{a}, {b}) but only [0, {self.scored_upto}) are scored"
                )
        self.checks += 1
