"""The learning-rate multiplier and the batch layout, as pure functions (no clocks, no torch).

Warmdown (technique-spec §3 (a)): the LR is flat, then falls linearly to 0 over the last
`warmdown_iters` steps. Two clocks can end a run, so both are honoured and the smaller multiplier
wins:
  * iterations: mult = (iterations - step) / warmdown_iters inside the last warmdown_iters steps;
  * wallclock:  warmdown_ms = warmdown_iters * (mean step time so far); mult = remaining_ms /
    warmdown_ms once remaining_ms <= warmdown_ms, where remaining_ms counts down to the cap at
    which training actually stops (MAX_WALLCLOCK_SECONDS - GPTQ_RESERVE_SECONDS).
The seed's 600 s runs never reach ITERATIONS, so only the wallclock branch matters there; CPU
presets finish on ITERATIONS long before the cap, so only the iteration branch matters there.

Warmdown by progress (technique-spec §3 (b), WARMDOWN_FRAC > 0, replaces the above):
  progress = max(elapsed_ms / cap_ms, step / iterations)   (whichever clock will end the run sooner)
  mult = 1 while progress < 1 - WARMDOWN_FRAC, else max((1 - progress) / WARMDOWN_FRAC, MIN_LR).
#1855 uses elapsed / (600 - reserve) s alone; at >= 30 ms/step and ITERATIONS=20000 the wallclock term
is always the larger one, so the max changes nothing there, and on CPU (no cap reached) it is the step
term, the "step-based equivalent". The same progress picks the training context (TRAIN_SEQ_SCHEDULE,
#2014) and, after a context change, SEQ_CHANGE_WARMUP_STEPS ramps the multiplier up again linearly.
"""

from __future__ import annotations

from pgolf.errors import ConfigError


def training_progress(step: int, elapsed_ms: float, iterations: int, cap_ms: float | None) -> float:
    """How far the run is, in [0, 1]: the larger of elapsed / cap and step / ITERATIONS."""
    frac = step / iterations if iterations > 0 else 0.0
    if cap_ms is not None and cap_ms > 0:
        frac = max(frac, elapsed_ms / cap_ms)
    return min(max(frac, 0.0), 1.0)


def lr_multiplier(
    step: int,
    elapsed_ms: float,
    iterations: int,
    warmdown_iters: int,
    cap_ms: float | None,
    warmdown_frac: float = 0.0,
    min_lr: float = 0.0,
) -> float:
    """Multiplier for the step about to run; `step` steps and `elapsed_ms` of training are done."""
    if warmdown_frac > 0:
        progress = training_progress(step, elapsed_ms, iterations, cap_ms)
        if progress < 1.0 - warmdown_frac:
            return 1.0
        return max((1.0 - progress) / warmdown_frac, min_lr)
    if warmdown_iters <= 0:
        return 1.0
    mult = 1.0
    if iterations > 0 and step >= iterations - warmdown_iters:
        mult = min(mult, max(iterations - step, 0) / warmdown_iters)
    if cap_ms is not None and cap_ms > 0 and step > 0:
        warmdown_ms = warmdown_iters * (elapsed_ms / step)
        remaining_ms = max(cap_ms - elapsed_ms, 0.0)
        if remaining_ms <= warmdown_ms:
            mult = min(mult, remaining_ms / max(warmdown_ms, 1e-9))
    return max(mult, min_lr) if min_lr > 0 else mult


def seq_len_at(plan: list[tuple[float, int]], progress: float) -> int:
    """The context of the stage holding `progress` (plan: [(END, LEN)] from config.parse_seq_schedule)."""
    for end, seq_len in plan:
        if progress <= end:
            return seq_len
    return plan[-1][1]


def rewarm_multiplier(step: int, change_step: int | None, warmup_steps: int) -> float:
    """LR factor after the context changed at `change_step`: (step - change_step + 1) / warmup_steps, up to 1."""
    if change_step is None or warmup_steps <= 0:
        return 1.0
    return min(max((step - change_step + 1) / warmup_steps, 0.0), 1.0)


def train_cap_ms(max_wallclock_seconds: float, gptq_reserve_seconds: float) -> float | None:
    """The train clock's stop point: MAX_WALLCLOCK_SECONDS minus the GPTQ reserve (None = no cap)."""
    if max_wallclock_seconds <= 0:
        return None
    return 1000.0 * (max_wallclock_seconds - gptq_reserve_seconds)


def grad_accum_steps(train_batch_tokens: int, world_size: int, micro_batch_seqs: int, seq_len: int) -> int:
    """Micro-steps per optimizer step that keep TRAIN_BATCH_TOKENS global whatever the world size."""
    per_micro = world_size * micro_batch_seqs * seq_len
    if train_batch_tokens % per_micro:
        raise ConfigError(
            f"TRAIN_BATCH_TOKENS={train_batch_tokens} is not a multiple of WORLD_SIZE={world_size} x "
            f"MICRO_BATCH_SEQS={micro_batch_seqs} x TRAIN_SEQ_LEN={seq_len} = {per_micro}; "
            "change MICRO_BATCH_SEQS (or the batch) so that it divides exactly"
        )
    return train_batch_tokens // per_micro

