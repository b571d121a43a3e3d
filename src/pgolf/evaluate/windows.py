"""Window, chunk and training-sequence planning: pure functions of the stream length.

Coordinates are TARGET indices. With T validation tokens there are N = T - 1 targets; target k is
tokens[k + 1], predicted from tokens[: k + 1]. A window (start, score_from, score_to) feeds the
inputs tokens[start : score_to] (at most seq_len of them), which predict targets start .. score_to-1,
and it scores only its suffix score_from .. score_to - 1. Every plan here tiles [0, N) exactly: the
scored ranges are contiguous, in order, and never overlap (technique-spec §1.5: each target once).

Sliding windows (spec §1.6, with the tail fix): starts 0, stride, 2·stride, ... up to N - seq_len;
the first window scores all of its targets, each later one only its last `stride`; if the last of
those does not reach N, ONE final window ending exactly at N scores only the still-unscored targets.
(PR #490 instead kept clipped windows past N - seq_len that re-scored the tail: 1,984 double counts.)
"""

from __future__ import annotations

from typing import NamedTuple

from pgolf.errors import ConfigError, DataError


class Window(NamedTuple):
    start: int  # first input position (= first predicted target)
    score_from: int  # first target this window scores
    score_to: int  # one past the last target it scores = one past its last input position


class Chunk(NamedTuple):
    index: int  # position in the chunk list (0 .. n_chunks - 1)
    first_window: int  # windows[first_window : last_window] belong to this chunk
    last_window: int
    lo: int  # the chunk's scored targets: [lo, hi)
    hi: int


def _check(n_tokens: int, seq_len: int) -> int:
    if n_tokens < 2:
        raise DataError(f"cannot evaluate {n_tokens} validation tokens; need at least 2")
    if seq_len < 1:
        raise ConfigError(f"eval seq len {seq_len} must be >= 1")
    return n_tokens - 1


def plan_rows(n_tokens: int, seq_len: int) -> list[Window]:
    """Non-overlapping rows, each starting cold; the last, partial row scores the remaining targets."""
    n = _check(n_tokens, seq_len)
    return [Window(s, s, min(s + seq_len, n)) for s in range(0, n, seq_len)]


def plan_windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """Sliding windows that score every target exactly once (see the module docstring)."""
    n = _check(n_tokens, seq_len)
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"EVAL_STRIDE={stride} must be between 1 and the eval seq len {seq_len}")
    if n <= seq_len:
        return [Window(0, 0, n)]
    windows = [Window(0, 0, seq_len)]
    for s in range(stride, n - seq_len + 1, stride):
        windows.append(Window(s, s + seq_len - stride, s + seq_len))
    if windows[-1].score_to < n:  # the tail fix: one window ending at N, scoring only what is left
        windows.append(Window(n - seq_len, windows[-1].score_to, n))
    return windows


def plan_chunks(windows: list[Window], chunk_tokens: int) -> list[Chunk]:
    """Group consecutive windows into TTT chunks: a window belongs to the chunk of its first scored
    target, ⌊score_from / chunk_tokens⌋ (clamped to the last chunk); empty chunks are dropped."""
    if chunk_tokens < 1:
        raise ConfigError(f"TTT_CHUNK_TOKENS={chunk_tokens} must be >= 1")
    if not windows:
        return []
    n = windows[-1].score_to
    last = (n - 1) // chunk_tokens
    chunks: list[Chunk] = []
    first = 0
    for i in range(1, len(windows) + 1):
        here = min(windows[i - 1].score_from // chunk_tokens, last)
        if i == len(windows) or min(windows[i].score_from // chunk_tokens, last) != here:
            chunks.append(Chunk(len(chunks), first, i, windows[first].score_from, windows[i - 1].score_to))
            first = i
    return chunks


def split_range(lo: int, hi: int, seq_len: int) -> list[tuple[int, int]]:
    """Training sequences over the targets [lo, hi): [lo, lo+L), [lo+L, lo+2L), ..., last one partial.
    A sequence (a, b) has inputs tokens[a:b] and labels tokens[a+1:b+1], i.e. exactly targets a..b-1."""
    return [(a, min(a + seq_len, hi)) for a in range(lo, hi, seq_len)]


def shard(n_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous share [a, b) of n items (sizes differ by at most one)."""
    return (n_items * rank) // world_size, (n_items * (rank + 1)) // world_size


def check_tiling(windows: list[Window], n_targets: int) -> None:
    """Assert the scored ranges tile [0, n_targets) in order: every target scored exactly once."""
    expect = 0
    for w in windows:
        if w.score_from != expect or not w.start <= w.score_from < w.score_to:
            raise AssertionError(f"window {w} breaks the tiling at target {expect}")
        expect = w.score_to
    if expect != n_targets:
        raise AssertionError(f"windows score targets [0, {expect}) but there are {n_targets}")
