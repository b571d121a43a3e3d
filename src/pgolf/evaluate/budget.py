"""The eval clock and the TTT budget guard (architecture.md "Clocks"; technique-spec §7.1 item 11).

The clock starts before the artifact is read, so decompression, model build and compile warm-up are
on it. Before adapting on a chunk, the guard projects

    elapsed + SAFETY · (adapt time of this chunk + score time of every window still unscored) + margin

and, if that passes EVAL_MAX_SECONDS, TTT stops for good: the remaining chunks are scored with the
weights as they are. Scoring is never skipped, so every target is still scored exactly once. Rates
come from what has been measured so far in this run (seconds per window scored, seconds per training
sequence-epoch); before the first adaptation the adapt rate is taken as ADAPT_PRIOR score-windows
per sequence (a forward + backward + optimizer step of one sequence vs one scoring forward).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

SAFETY = 1.25  # multiplier on projected work (rates drift; ranks wait for the slowest)
ADAPT_PRIOR = 4.0  # one training sequence ~ this many scoring windows, until measured
MARGIN_FRACTION = 0.02  # + 2% of the budget (at least MARGIN_MIN_S) for the final reduce and writes
MARGIN_MIN_S = 1.0

Clock = Callable[[], float]


class EvalClock:
    """Wall time since construction, with named parts (load, build, warmup, score, ttt; ngram when the
    n-gram tilt's precompute runs: it is eval work and on the clock, as in #2018/#2130/#2135)."""

    PARTS = ("load", "build", "warmup", "score", "ttt")  # + "ngram", "phase" when they run

    def __init__(self, clock: Clock | None = None):
        self.clock = clock or time.perf_counter
        self.t0 = self.clock()
        self.parts = {name: 0.0 for name in self.PARTS}

    def elapsed(self) -> float:
        return self.clock() - self.t0

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        t = self.clock()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + self.clock() - t


@dataclass
class BudgetGuard:
    """Decides, chunk by chunk, whether adapting still leaves time to score everything left."""

    max_seconds: float  # 0 = no limit
    score_seconds: float = 0.0
    windows_scored: int = 0
    adapt_seconds: float = 0.0
    seq_epochs_adapted: int = 0
    fired: bool = False
    reason: str = ""
    last_projection: float = field(default=0.0)

    def record_score(self, seconds: float, n_windows: int) -> None:
        self.score_seconds += seconds
        self.windows_scored += n_windows

    def record_adapt(self, seconds: float, seq_epochs: int) -> None:
        self.adapt_seconds += seconds
        self.seq_epochs_adapted += seq_epochs

    @property
    def margin(self) -> float:
        return max(MARGIN_MIN_S, MARGIN_FRACTION * self.max_seconds)

    def projection(self, elapsed: float, windows_left: int, seq_epochs_next: int) -> float:
        """Projected eval time if we adapt on the next chunk and then score everything left."""
        per_window = self.score_seconds / max(self.windows_scored, 1)
        if self.seq_epochs_adapted:
            per_seq = self.adapt_seconds / self.seq_epochs_adapted
        else:
            per_seq = ADAPT_PRIOR * per_window
        work = per_window * windows_left + per_seq * seq_epochs_next
        return elapsed + SAFETY * work + self.margin

    def allow_adapt(self, elapsed: float, windows_left: int, seq_epochs_next: int, chunk: int,
                    n_chunks: int) -> bool:
        """False from the first chunk whose adaptation would overrun the budget on (sticky)."""
        if self.fired:
            return False
        if self.max_seconds <= 0:
            return True
        self.last_projection = self.projection(elapsed, windows_left, seq_epochs_next)
        if self.last_projection > self.max_seconds:
            score_only = self.projection(elapsed, windows_left, 0)
            overrun = (f"; scoring alone projects {score_only:.1f}s, so the budget will be exceeded"
                       if score_only > self.max_seconds else "")
            self.fire(
                f"projected {self.last_projection:.1f}s > EVAL_MAX_SECONDS={self.max_seconds:g} at chunk "
                f"{chunk + 1}/{n_chunks} (elapsed {elapsed:.1f}s); TTT stopped, scoring continues{overrun}"
            )
        return not self.fired

    def fire(self, reason: str) -> None:
        if not self.fired:
            self.fired, self.reason = True, reason
