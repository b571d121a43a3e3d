"""Scoring: batched per-token NLL over windows, and the tally that commits scored targets.

`Tally` is the single place where a target becomes "scored". It keeps the float64 sums (NLL, count,
bytes), the optional per-token audit array, and `scored_upto`: the end of the committed prefix of the
stream, which only grows, one chunk at a time. TTT asks the tally before every optimizer step
(`require_scored`), so a step on a target that has not been committed cannot happen silently. With the
n-gram tilt on, the scoring loop asks it before scoring a range (`require_causal_hints`): every hint must
come from counts of earlier targets' labels only, never the target's own label or a later one.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.evaluate.ngram import NgramHints, tilt_logits
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


def to_device(rows: Sequence[Sequence[int]], width: int, device: torch.device) -> torch.Tensor:
    """(n, width) long tensor on `device`; on CUDA from pinned memory, so the copy does not block."""
    t = torch.tensor(list(rows), dtype=torch.long).reshape(-1, width)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def spans_tensor(spans: Sequence[tuple[int, int]] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(n, 2) long tensor of (a, b) spans on `device` (a tensor already there is returned as is)."""
    return spans if isinstance(spans, torch.Tensor) else to_device(spans, 2, device)


def make_batch(tokens: torch.Tensor, spans: Sequence[tuple[int, int]] | torch.Tensor, seq_len: int,
               rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs/labels for spans of target indices: row i = tokens[a:b] -> tokens[a+1:b+1].

    `spans` is a list of (a, b) or, in the scoring loops, an (n, 2) long tensor already on the device,
    so building a batch copies nothing from the host. Rows are right-padded to seq_len (input 0, label
    IGNORE) and the batch to `rows` rows, so a compiled forward sees one static shape; a causal model's
    outputs at real positions do not depend on what follows them, so padding never changes a score."""
    device = tokens.device
    spans = spans_tensor(spans, device)
    n_rows = max(spans.size(0), rows or 0, 1)
    if n_rows > spans.size(0):  # padded rows are the empty span (0, 0)
        spans = torch.nn.functional.pad(spans, (0, 0, 0, n_rows - spans.size(0)))
    start, length = spans[:, 0], spans[:, 1] - spans[:, 0]
    col = torch.arange(seq_len, device=device)
    valid = col[None, :] < length[:, None]
    pos = torch.where(valid, start[:, None] + col[None, :], torch.zeros_like(col)[None, :])
    x = torch.where(valid, tokens[pos], 0)
    y = torch.where(valid, tokens[pos + valid.long()], IGNORE)
    return x, y


def token_nll(model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, temperature: float,
              tilt: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, T) fp32 NLL in nats of labels y under softmax(logits / temperature); 0 at IGNORE labels.
    `tilt` = (token, boost), each (B, T): the n-gram tilt, boost added to that token's logit (scoring only)."""
    logits = model_fn(x).float()
    if temperature != 1.0:
        logits = logits / temperature
    if tilt is not None:
        logits = tilt_logits(logits, *tilt, inplace=not logits.requires_grad)  # no second (B, T, V) copy
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none", ignore_index=IGNORE)
    return nll.view_as(y)


def window_table(windows: Sequence[Window], device: torch.device) -> torch.Tensor:
    """(n, 3) long tensor of (start, score_from, score_to) on `device`: the scoring loop's one copy."""
    return to_device(windows, 3, device)


def score_windows(model_fn: ModelFn, tokens: torch.Tensor, windows: Sequence[Window], seq_len: int,
                  batch_seqs: int, temperature: float, pad_rows: bool,
                  table: torch.Tensor | None = None, hints: NgramHints | None = None) -> torch.Tensor:
    """fp32 NLL of the targets scored by `windows`, concatenated in stream order (caller sets no-grad).

    `table` is `window_table(windows)` already on the device; per batch nothing is copied from the host
    and nothing waits for the device: each row's scored suffix is scattered to its target's slot (the
    other positions go to a trash slot), with slot counts known on the host from `windows`. With `hints`,
    every position's distribution is tilted by the hint of the target it predicts (ngram.py)."""
    device = tokens.device
    if not windows:
        return torch.zeros(0, dtype=torch.float32, device=device)
    if table is None:
        table = window_table(windows, device)
    out: list[torch.Tensor] = []
    col = torch.arange(seq_len, device=device)
    for i in range(0, len(windows), batch_seqs):
        rows = table[i:i + batch_seqs]
        base, n = windows[i].score_from, windows[min(i + batch_seqs, len(windows)) - 1].score_to
        n -= base
        x, y = make_batch(tokens, rows[:, [0, 2]], seq_len, batch_seqs if pad_rows else None)
        target = rows[:, :1] + col[None, :]  # (b, T): the target each position predicts
        tilt = None
        if hints is not None:  # padded rows predict nothing (labels IGNORE): any hint will do there
            tilt = hints.at(F.pad(target, (0, 0, 0, x.size(0) - target.size(0))))
        with autocast_for(device):
            nll = token_nll(model_fn, x, y, temperature, tilt)
        scored = (target >= rows[:, 1:2]) & (target < rows[:, 2:3])
        slot = torch.where(scored, target - base, n)
        flat = torch.zeros(n + 1, dtype=nll.dtype, device=device)
        flat[slot.flatten()] = nll[: rows.size(0)].flatten()
        out.append(flat[:n])
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
        self.hint_checks = 0  # scored ranges whose n-gram hints were verified as causal

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

    def require_causal_hints(self, lo: int, hi: int, hints: NgramHints) -> None:
        """Raise unless the n-gram hint of every target k in [lo, hi) counts only labels of targets < k.

        Earlier targets of the range being scored may count (they precede k in the one left-to-right
        pass, as the model's own context does); target k's own label or any later one may not."""
        if hi <= lo:
            return
        newest = hints.evidence[lo:hi]
        bad = newest >= torch.arange(lo, hi, device=newest.device)
        if bool(bad.any()):
            k = lo + int(bad.nonzero()[0, 0])
            raise ScoreFirstViolation(
                f"the n-gram hint for target {k} counts the label of target {int(hints.evidence[k])}: "
                "a hint may only count labels of earlier targets"
            )
        self.hint_checks += 1


class DocTally(Tally):
    """The Tally of phased LoRA TTT (docs.py): each document is its own committed prefix.

    Documents are scored in an order other than the stream's, chunk by chunk, so the committed set is a
    prefix per document: `commit_doc` extends one (scoring a target twice, or skipping one, raises), and
    `require_scored` checks a span against the prefix of the document that holds it. Before a global
    phase the ranks merge their prefixes (`merge`), so a phase can check the documents other ranks scored.
    """

    def __init__(self, target_bytes: np.ndarray, keep_per_token: bool, doc_lo: np.ndarray, doc_hi: np.ndarray):
        super().__init__(target_bytes, keep_per_token)
        self.doc_lo, self.doc_hi = np.asarray(doc_lo, np.int64), np.asarray(doc_hi, np.int64)
        self.upto = self.doc_lo.copy()  # per document: targets [lo, upto) are committed

    def add_targets(self, targets: np.ndarray, nll: np.ndarray) -> None:
        """Add this rank's scores of the given targets (any order; each committed once via commit_doc)."""
        if targets.size == 0:
            return
        self.nll_sum += float(nll.astype(np.float64).sum())
        self.count += int(targets.size)
        self.byte_sum += int(self.target_bytes[targets].sum(dtype=np.int64))
        if self.per_token is not None:
            self.per_token[targets] = nll.astype(np.float32)

    def commit_doc(self, doc: int, lo: int, hi: int) -> None:
        if lo != self.upto[doc] or not lo <= hi <= self.doc_hi[doc]:
            raise ScoreFirstViolation(f"commit of [{lo}, {hi}) in document {doc} does not extend its scored "
                                      f"prefix [{self.doc_lo[doc]}, {self.upto[doc]})")
        self.upto[doc] = hi

    def require_scored(self, spans: Sequence[tuple[int, int]]) -> None:
        for a, b in spans:
            doc = int(np.searchsorted(self.doc_lo, a, side="right")) - 1
            if b <= a:
                continue
            if doc < 0 or b > self.upto[doc]:
                done = f"[{self.doc_lo[doc]}, {self.upto[doc]})" if doc >= 0 else "nothing"
                raise ScoreFirstViolation(f"TTT would train on targets [{a}, {b}) but only {done} of their "
                                          "document are scored")
        self.checks += 1

    def merge(self, reduce_max: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Every rank's committed prefixes (each document is scored by one rank: the max is its prefix)."""
        self.upto = reduce_max(torch.from_numpy(self.upto)).numpy().astype(np.int64)

    def require_causal_hints_in_order(self, targets: torch.Tensor, hints: NgramHints, time: torch.Tensor) -> None:
        """Raise unless the hint of every target counts only labels of targets scored before it (`time`)."""
        ev = hints.evidence[targets].long()
        bad = (ev >= 0) & (time[ev.clamp(min=0)] >= time[targets])
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ScoreFirstViolation(f"the n-gram hint for target {int(targets[i])} counts the label of target "
                                      f"{int(ev[i])}, which is not scored before it")
        self.hint_checks += 1
