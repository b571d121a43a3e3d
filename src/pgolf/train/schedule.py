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
"""

from __future__ import annotations

from pgolf.errors import ConfigError


def lr_multiplier(
    step: int,
    elapsed_ms: float,
    iterations: int,
    warmdown_iters: int,
    cap_ms: float | None,
) -> float:
    """Multiplier for the step about to run; `step` steps and `elapsed_ms` of training are done."""
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
    return mult


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


def train_fraction(step: int, elapsed_ms: float, iterations: int, cap_ms: float | None) -> float:
    """How far training is, in [0, 1]: the larger of step / ITERATIONS and elapsed / cap (the clock
    that will end the run first). Depth recurrence switches on at ENABLE_LOOPING_AT of it (#1855:
    elapsed / cap on the 600 s runs; CPU presets end on ITERATIONS, so there the step count rules)."""
    by_steps = step / iterations if iterations > 0 else 0.0
    by_clock = elapsed_ms / cap_ms if cap_ms else 0.0
    return min(1.0, max(by_steps, by_clock))
