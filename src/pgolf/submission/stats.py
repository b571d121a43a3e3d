"""Is a set of runs better than a reference? One-sided Welch t-test in nats per token.

The challenge README's record rule: beat the current record by at least 0.005 nats with enough runs
to show it at p < 0.01 (one-sided). The later leaderboard rule for a chronological progression row:
better than the previous frontier at p < 0.25. Both are tests on val_loss in nats per token; a score
in bits per byte converts with the runs' measured bytes per token:

    nats/token = bpb * ln(2) * bytes/token

Pure Python (no numpy, scipy or torch): Welch's t with the Welch-Satterthwaite degrees of freedom,
and the Student-t CDF through the regularized incomplete beta function (continued fraction, modified
Lentz). tests/test_submission_stats.py checks it against scipy.stats.ttest_ind(equal_var=False).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal

from pgolf.errors import PgolfError

LN2 = math.log(2.0)
RECORD_MARGIN_NATS = 0.005  # README: "beat the existing SOTA by at least 0.005 nats"
RECORD_ALPHA = 0.01  # "... show at p < 0.01"
PROGRESSION_ALPHA = 0.25  # leaderboard progression rows (PR #1900/#1902): better at p < 0.25
MAX_SEEDS = 1000

Alternative = Literal["less", "greater", "two-sided"]


class StatsError(PgolfError):
    """Too few values, a zero-variance comparison that has no answer, a bad argument."""


# ---------------------------------------------------------------------------------------------
# special functions


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz); converges fast for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))  # even step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))  # odd step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            return h
    raise StatsError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")  # pragma: no cover


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise StatsError(f"betainc needs a, b > 0 (got a={a}, b={b})")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df > 0 degrees of freedom (df may be fractional)."""
    if math.isnan(t) or not df > 0:
        raise StatsError(f"t_cdf needs a number and df > 0 (got t={t}, df={df})")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_sf(t: float, df: float) -> float:
    """P(T > t), accurate in the far upper tail."""
    return t_cdf(-t, df)


# ---------------------------------------------------------------------------------------------
# samples and the test


@dataclass(frozen=True)
class Sample:
    """Values in nats per token, or only their summary (a published mean with its std and n)."""

    label: str
    mean: float
    std: float  # sample standard deviation (ddof = 1); 0 for a fixed reference value
    n: int
    values: tuple[float, ...] = ()
    bytes_per_token: float | None = None  # measured on the validation set, when known

    @classmethod
    def of(cls, label: str, values: Iterable[float], bytes_per_token: float | None = None) -> "Sample":
        vals = tuple(float(v) for v in values)
        if not vals:
            raise StatsError(f"{label}: no values")
        mean = math.fsum(vals) / len(vals)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        return cls(label, mean, std, len(vals), vals, bytes_per_token)

    @property
    def var_of_mean(self) -> float:
        return self.std ** 2 / self.n


def nats_from_bpb(bpb: float, bytes_per_token: float) -> float:
    return bpb * LN2 * bytes_per_token


def bpb_from_nats(nats: float, bytes_per_token: float) -> float:
    return nats / (LN2 * bytes_per_token)


@dataclass(frozen=True)
class WelchResult:
    t: float
    df: float
    p: float
    alternative: str
    margin: float


def welch(a: Sample, b: Sample, alternative: Alternative = "less", margin: float = 0.0) -> WelchResult:
    """Welch's t-test of mean(a) - mean(b) against -margin.

    alternative="less": H1 is mean(a) < mean(b) - margin, i.e. a is lower (better) by more than
    margin. margin=0 gives scipy.stats.ttest_ind(a, b, equal_var=False, alternative=...).
    """
    if alternative not in ("less", "greater", "two-sided"):
        raise StatsError(f"alternative={alternative!r}: choose less, greater or two-sided")
    if a.n < 2 and b.n < 2:
        raise StatsError("Welch's test needs at least 2 values on one side")
    va, vb = a.var_of_mean, b.var_of_mean
    se2 = va + vb
    diff = a.mean - b.mean + margin
    if se2 == 0.0:
        if diff == 0.0:
            raise StatsError(f"{a.label} and {b.label} have zero variance and equal means: no test")
        t, df = math.copysign(math.inf, diff), math.inf
    else:
        t = diff / math.sqrt(se2)
        # Welch-Satterthwaite; a side with n = 1 and std 0 (a fixed reference) contributes nothing
        denom = (va * va / (a.n - 1) if a.n > 1 else 0.0) + (vb * vb / (b.n - 1) if b.n > 1 else 0.0)
        df = se2 * se2 / denom if denom > 0 else math.inf
    if math.isinf(df):
        cdf = 0.5 * math.erfc(-t / math.sqrt(2.0)) if math.isfinite(t) else (1.0 if t > 0 else 0.0)
        sf = 1.0 - cdf if math.isfinite(t) else (0.0 if t > 0 else 1.0)
    else:
        cdf, sf = t_cdf(t, df), t_sf(t, df)
    p = {"less": cdf, "greater": sf, "two-sided": min(1.0, 2.0 * min(cdf, sf))}[alternative]
    return WelchResult(t=t, df=df, p=p, alternative=alternative, margin=margin)


def seeds_needed(runs: Sample, reference: Sample, margin: float, alpha: float,
                 limit: int = MAX_SEEDS) -> int | None:
    """Fewest runs (reference unchanged) for which the observed mean and std would give p < alpha;
    None if the observed improvement does not exceed the margin (no number of seeds helps)."""
    if reference.mean - runs.mean <= margin:
        return None
    for n in range(2, limit + 1):
        trial = Sample(runs.label, runs.mean, runs.std, n)
        if welch(trial, reference, "less", margin).p < alpha:
            return n
    return None


@dataclass(frozen=True)
class Comparison:
    runs: dict[str, Any]
    reference: dict[str, Any]
    improvement_nats: float  # reference mean - runs mean (positive = runs are better)
    improvement_bpb: float | None
    test: dict[str, Any]  # plain one-sided Welch test (margin 0)
    record: dict[str, Any]  # >= RECORD_MARGIN_NATS at p < RECORD_ALPHA
    progression: dict[str, Any]  # better at p < PROGRESSION_ALPHA
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _describe(s: Sample) -> dict[str, Any]:
    out: dict[str, Any] = {"label": s.label, "n": s.n, "mean_nats": s.mean, "std_nats": s.std}
    if s.values:
        out["values_nats"] = list(s.values)
    if s.bytes_per_token:
        out["bytes_per_token"] = s.bytes_per_token
        out["mean_bpb"] = bpb_from_nats(s.mean, s.bytes_per_token)
        out["std_bpb"] = bpb_from_nats(s.std, s.bytes_per_token)
    return out


def compare(runs: Sample, reference: Sample, margin: float = RECORD_MARGIN_NATS,
            record_alpha: float = RECORD_ALPHA, progression_alpha: float = PROGRESSION_ALPHA) -> Comparison:
    """The README's record rule and the progression rule for `runs` against `reference`."""
    if runs.n < 2:
        raise StatsError(f"{runs.label}: {runs.n} run; the test needs at least 2 (3 is usual)")
    notes = []
    bpt = runs.bytes_per_token
    if bpt and reference.bytes_per_token and abs(bpt - reference.bytes_per_token) > 1e-6 * bpt:
        notes.append(f"bytes/token differ ({bpt:.6f} vs {reference.bytes_per_token:.6f}): "
                     "a different tokenizer or validation set; nats per token are not comparable")
    if reference.n == 1 and reference.std == 0:
        notes.append("reference is a single fixed value: one-sample test against it")
    plain = welch(runs, reference, "less", 0.0)
    rec = welch(runs, reference, "less", margin)
    improvement = reference.mean - runs.mean
    return Comparison(
        runs=_describe(runs),
        reference=_describe(reference),
        improvement_nats=improvement,
        improvement_bpb=bpb_from_nats(improvement, bpt) if bpt else None,
        test=asdict(plain),
        record={"rule": f">= {margin} nats better at p < {record_alpha}", "margin_nats": margin,
                "alpha": record_alpha, "t": rec.t, "df": rec.df, "p": rec.p,
                "holds": improvement >= margin and rec.p < record_alpha,
                "seeds_needed": seeds_needed(runs, reference, margin, record_alpha)},
        progression={"rule": f"better at p < {progression_alpha}", "alpha": progression_alpha,
                     "p": plain.p, "holds": improvement > 0 and plain.p < progression_alpha,
                     "seeds_needed": seeds_needed(runs, reference, 0.0, progression_alpha)},
        notes=notes,
    )


def format_comparison(c: Comparison) -> str:
    """The human report: one fact per line."""
    def side(d: dict[str, Any]) -> str:
        text = f"{d['label']}: n={d['n']} mean {d['mean_nats']:.5f} nats std {d['std_nats']:.5f}"
        if "mean_bpb" in d:
            text += f" ({d['mean_bpb']:.5f} bpb, std {d['std_bpb']:.5f})"
        return text

    def verdict(rule: dict[str, Any]) -> str:
        need = rule["seeds_needed"]
        need_text = "no number of seeds (improvement too small)" if need is None else f"{need} seeds"
        return (f"{'holds' if rule['holds'] else 'fails'} (p={rule['p']:.3g}); "
                f"at the observed std: {need_text}")

    bpb = f" ({c.improvement_bpb:.5f} bpb)" if c.improvement_bpb is not None else ""
    lines = [
        side(c.runs),
        side(c.reference),
        f"improvement: {c.improvement_nats:.5f} nats{bpb}",
        f"Welch one-sided: t={c.test['t']:.4g} df={c.test['df']:.4g} p={c.test['p']:.4g}",
        f"record rule ({c.record['rule']}): {verdict(c.record)}",
        f"progression rule ({c.progression['rule']}): {verdict(c.progression)}",
    ]
    lines += [f"note: {n}" for n in c.notes]
    return "\n".join(lines)

