"""Planning and bookkeeping of pgolf.evaluate, without a model: windows, chunks, batches, tally, guard."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pgolf.errors import ConfigError, DataError
from pgolf.evaluate import Window, plan_chunks, plan_rows, plan_windows, split_range
from pgolf.evaluate.budget import ADAPT_PRIOR, SAFETY, BudgetGuard, EvalClock
from pgolf.evaluate.score import IGNORE, ScoreFirstViolation, Tally, make_batch
from pgolf.evaluate.ttt import cosine_lr
from pgolf.evaluate.windows import check_tiling, shard


def coverage(windows: list[Window], n_targets: int) -> np.ndarray:
    counts = np.zeros(n_targets, dtype=np.int64)
    for w in windows:
        counts[w.score_from:w.score_to] += 1
    return counts


# --- sliding windows -------------------------------------------------------------------------


def test_sliding_windows_by_hand():
    # 11 tokens -> 10 targets; L=4, stride 2: starts 0,2,4,6 and the last one ends exactly at 10
    assert plan_windows(11, 4, 2) == [(0, 0, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    # 12 tokens -> 11 targets: regular starts stop at 6 (end 10); one final window [7, 11) scores only 10
    assert plan_windows(12, 4, 2) == [(0, 0, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10), (7, 10, 11)]
    # a stream shorter than one window is one short window
    assert plan_windows(3, 4, 2) == [(0, 0, 2)]
    assert plan_windows(5, 4, 2) == [(0, 0, 4)]


@pytest.mark.parametrize("n_tokens,seq_len,stride", [
    (2, 8, 4), (9, 8, 4), (10, 8, 4), (1000, 64, 16), (1001, 64, 16), (1047, 64, 64), (5000, 128, 1),
    (4097, 2048, 64), (131_073 + 17, 2048, 64),
])
def test_sliding_windows_score_every_target_once_with_full_context(n_tokens, seq_len, stride):
    windows = plan_windows(n_tokens, seq_len, stride)
    n = n_tokens - 1
    assert (coverage(windows, n) == 1).all()
    check_tiling(windows, n)
    for w in windows:
        assert w.score_to - w.start <= seq_len  # at most one window of input
        if w.start > 0:  # every target after the first window sees >= seq_len - stride tokens of context
            assert w.score_from - w.start >= seq_len - stride
            assert w.score_to - w.start == seq_len
    assert windows[-1].score_to == n


def test_tail_fix_vs_clipped_windows():
    """PR #490 kept every start with >= stride tokens left; the clipped windows past N - L all re-score
    the final stride targets: 31 redundant windows and 1,984 double counts at L=2048, stride 64 (§1.6)."""
    seq_len, stride = 2048, 64
    n = 4 * seq_len  # targets; the truncated sp1024 val stream is also a multiple of 2048
    buggy = []
    for s in range(0, n, stride):
        end = min(s + seq_len, n)
        if s == 0 or end - s >= stride:
            buggy.append(Window(s, s if s == 0 else end - stride, end))
    over = coverage(buggy, n) - 1
    assert len(buggy) - len(plan_windows(n + 1, seq_len, stride)) == 31 and over.sum() == 1984
    assert (coverage(plan_windows(n + 1, seq_len, stride), n) == 1).all()


def test_rows_by_hand():
    assert plan_rows(11, 4) == [(0, 0, 4), (4, 4, 8), (8, 8, 10)]  # last partial row still scored
    assert plan_rows(9, 4) == [(0, 0, 4), (4, 4, 8)]
    assert (coverage(plan_rows(1234, 100), 1233) == 1).all()


def test_bad_plans_fail_in_one_line():
    with pytest.raises(DataError, match="need at least 2"):
        plan_windows(1, 4, 2)
    with pytest.raises(ConfigError, match="EVAL_STRIDE"):
        plan_windows(100, 4, 5)
    with pytest.raises(AssertionError, match="tiling"):
        check_tiling([Window(0, 0, 4), Window(2, 5, 6)], 6)
    with pytest.raises(AssertionError, match="there are 7"):
        check_tiling([Window(0, 0, 4), Window(2, 4, 6)], 7)


# --- chunks and training sequences ------------------------------------------------------------


def test_chunks_by_hand():
    # 21 targets, L=4, stride 2, chunk 8: windows score [0,4) [4,6) ... [18,20) [20,21)
    windows = plan_windows(22, 4, 2)
    chunks = plan_chunks(windows, 8)
    assert [(c.lo, c.hi) for c in chunks] == [(0, 8), (8, 16), (16, 21)]
    assert [c.index for c in chunks] == [0, 1, 2]
    assert chunks[0].first_window == 0 and chunks[-1].last_window == len(windows)
    for c in chunks:  # each window lies in the chunk of its first scored target
        for w in windows[c.first_window:c.last_window]:
            assert c.lo <= w.score_from < c.hi and w.score_to <= c.hi


@pytest.mark.parametrize("n_tokens,seq_len,stride,chunk", [(5000, 64, 16, 1024), (3001, 64, 16, 64), (777, 32, 8, 100)])
def test_chunks_tile_the_stream(n_tokens, seq_len, stride, chunk):
    windows = plan_windows(n_tokens, seq_len, stride)
    chunks = plan_chunks(windows, chunk)
    assert chunks[0].lo == 0 and chunks[-1].hi == n_tokens - 1
    for a, b in itertools.pairwise(chunks):
        assert a.hi == b.lo and a.last_window == b.first_window
    # the last chunk is clamped: nothing starts past ceil(N / chunk) chunks
    assert len(chunks) <= -(-(n_tokens - 1) // chunk)


def test_split_range_and_shard():
    assert split_range(10, 25, 4) == [(10, 14), (14, 18), (18, 22), (22, 25)]
    assert split_range(0, 8, 4) == [(0, 4), (4, 8)]
    assert [shard(5, r, 2) for r in range(2)] == [(0, 2), (2, 5)]
    assert [shard(1, r, 2) for r in range(2)] == [(0, 0), (0, 1)]
    assert [shard(64, r, 8) for r in range(8)] == [(8 * r, 8 * r + 8) for r in range(8)]


def test_cosine_lr_by_hand():
    lrs = [cosine_lr(1e-4, c, 5) for c in range(5)]
    assert lrs == pytest.approx([1e-4, 0.5 * (1 + np.cos(np.pi / 4)) * 1e-4, 0.5e-4,
                                 0.5 * (1 - np.cos(np.pi / 4)) * 1e-4, 0.0])
    assert cosine_lr(1e-4, 0, 1) == 1e-4


# --- batches and the tally ---------------------------------------------------------------------


def test_make_batch_pads_rows_and_length():
    tokens = torch.arange(100, 120)
    x, y = make_batch(tokens, [(0, 4), (5, 7)], seq_len=4, rows=3)
    assert x.tolist() == [[100, 101, 102, 103], [105, 106, 0, 0], [0, 0, 0, 0]]
    assert y.tolist() == [[101, 102, 103, 104], [106, 107, IGNORE, IGNORE], [IGNORE] * 4]
    x, y = make_batch(tokens, [], seq_len=2)  # an empty share still yields one all-ignored row
    assert y.tolist() == [[IGNORE, IGNORE]]


def test_tally_commits_in_order_and_guards_training():
    tally = Tally(np.array([1, 2, 3, 4, 5, 6], dtype=np.int32), keep_per_token=True)
    tally.add(0, torch.tensor([0.5, 1.0, 1.5]))
    assert (tally.nll_sum, tally.count, tally.byte_sum) == (3.0, 3, 6)
    with pytest.raises(ScoreFirstViolation):
        tally.require_scored([(0, 1)])  # scored locally but not committed yet
    tally.commit(0, 3)
    tally.require_scored([(0, 2), (1, 3)])
    with pytest.raises(ScoreFirstViolation, match=r"\[2, 4\)"):
        tally.require_scored([(2, 4)])
    with pytest.raises(ScoreFirstViolation):
        tally.commit(4, 6)  # a gap
    assert tally.per_token.tolist() == [0.5, 1.0, 1.5, 0, 0, 0]


# --- the clock and the guard --------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_eval_clock_parts():
    fake = FakeClock()
    clock = EvalClock(fake)
    with clock.part("load"):
        fake.t += 2.0
    with clock.part("score"):
        fake.t += 3.0
    fake.t += 1.0
    assert clock.elapsed() == 6.0
    assert clock.parts["load"] == 2.0 and clock.parts["score"] == 3.0 and clock.parts["ttt"] == 0.0


def test_guard_projection_by_hand():
    guard = BudgetGuard(max_seconds=100.0)
    guard.record_score(10.0, 100)  # 0.1 s per window
    # no adaptation measured yet: one sequence-epoch ~ ADAPT_PRIOR windows
    expect = 20.0 + SAFETY * (0.1 * 500 + ADAPT_PRIOR * 0.1 * 30) + 2.0  # margin = 2% of 100 s
    assert guard.projection(elapsed=20.0, windows_left=500, seq_epochs_next=30) == pytest.approx(expect)
    guard.record_adapt(6.0, 30)  # 0.2 s per sequence-epoch, measured
    assert guard.projection(20.0, 500, 30) == pytest.approx(20.0 + SAFETY * (50.0 + 6.0) + 2.0)
    assert guard.allow_adapt(20.0, 500, 30, chunk=1, n_chunks=9)  # 92 s <= 100 s
    assert not guard.allow_adapt(30.0, 500, 30, chunk=2, n_chunks=9)  # 102 s > 100 s
    assert guard.fired and "chunk 3/9" in guard.reason and "EVAL_MAX_SECONDS=100" in guard.reason
    assert "scoring alone" not in guard.reason  # 30 + 1.25 * 50 + 2 = 94.5 s still fits
    hopeless = BudgetGuard(max_seconds=10.0)
    hopeless.record_score(10.0, 100)
    assert not hopeless.allow_adapt(5.0, 100, 1, chunk=0, n_chunks=2)
    assert "scoring alone projects 18.5s" in hopeless.reason  # 5 + 1.25 * 10 + 1
    assert not guard.allow_adapt(0.0, 0, 0, chunk=3, n_chunks=9)  # sticky: TTT never resumes


def test_guard_off_when_budget_is_zero():
    guard = BudgetGuard(max_seconds=0.0)
    guard.record_score(1e6, 1)
    assert guard.allow_adapt(1e6, 10**6, 10**6, chunk=0, n_chunks=2) and not guard.fired
