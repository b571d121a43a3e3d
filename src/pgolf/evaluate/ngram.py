"""Token-only causal n-gram tilt: a prefix-only n-gram expert that nudges the scoring distribution.

Facts from the challenge (technique-spec §10): PR #1514 (merged) added the causal token expert of the
PR #1420 kernel family with its within-word and word-start experts switched off; the audit in the PR #1967
thread showed that those two experts decide whether to fire by looking at the realized target token
(`boundary_lut[tokens[i]]`, `starts_new_word_lut[tokens[i]]`), so only the token expert is legal. #2018,
#2130 and #2135 run its precompute inside the eval timer, with order 16, threshold 0.8, boost 2.625 (#2135
is #2130 with more GPTQ calibration batches); #2130 logs 628,130 hinted targets of 47,851,520.

The expert. Target k is tokens[k + 1]; its context is the last ORDER - 1 tokens tokens[k - ORDER + 2 .. k].
Over the earlier targets j < k with the same context it counts each next token; the hint h is the most
frequent one (the first to reach the top count, as the upstream kernel's strict `>` update) and its
confidence is top_count / total. Where the confidence reaches the threshold the scored distribution is

    p'(a) = exp(β·[a = h]) · p(a) / Z,   Z = Σ_a exp(β·[a = h]) · p(a) = 1 + p(h)·(e^β - 1),

β added to the hint's logit before the softmax over the whole vocabulary (`tilt_logits`): a proper
distribution, so bits per byte stays an honest code length (Issue #1017 C2).

Legality (Issue #1017 C1, C3, C4). The hint for target k is a function of tokens[0 .. k] only: of the
labels of targets < k and of target k's own inputs, never of its label. That is what an online state gives
that absorbs each target's label right after the target is scored, in one left-to-right pass; `build_hints`
computes the same table at once, vectorized (two stable sorts and a few scans over the stream), on the
eval device. Each hint carries `evidence`: the newest target whose label its counts include (< k); the
Tally refuses a hint whose evidence is not before its own target (score.Tally.require_causal_hints).

Ranks: like the accepted PRs (#1514's kernel family: one left-to-right pass over the whole validation
stream, each target indexed by its stream position), the state for target k is the stream prefix, whichever
rank scores k. Every rank builds the same table from the same tokens; `check_same_on_all_ranks` proves it.

Contexts are keyed by two polynomial hashes modulo primes below 2^31 (62 bits): distinct 15-token contexts
collide with probability about m^2 / 2^63 (~2.5e-4 for all 47.8M validation contexts together). A
collision merges two contexts' counts; the hint stays causal and deterministic on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgolf import dist

# (prime, base) pairs of the two context hashes; primes below 2^31 keep h·base inside int64
HASHES = ((2_147_483_647, 1_000_003), (2_147_483_629, 916_132_831))
GROUP_SHIFT = 27  # running maxima are scanned as group·2^27 + count: streams up to 2^27 targets (134M)


@dataclass
class NgramHints:
    """Per target k of the validation stream (all on one device)."""

    token: torch.Tensor  # (n,) int32: the hinted next token (0 where there is no hint)
    boost: torch.Tensor  # (n,) float32: β where the hint fires, else 0 (adding 0 leaves a logit as it is)
    evidence: torch.Tensor  # (n,) int32: newest target whose label the hint's counts include; -1 = no hint
    order: int
    threshold: float
    beta: float

    @property
    def fired(self) -> int:
        return int((self.evidence >= 0).sum())

    def at(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, boost) at target indices of any shape; indices past the end (padding) are clamped."""
        t = targets.clamp(0, self.token.numel() - 1)
        return self.token[t].long(), self.boost[t]


def tilt_logits(logits: torch.Tensor, token: torch.Tensor, boost: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """logits (..., V) with `boost` added at `token` (shapes (...)): softmax of the result is p' above."""
    add = logits.scatter_add_ if inplace else logits.scatter_add
    return add(-1, token.unsqueeze(-1), boost.unsqueeze(-1).to(logits.dtype))


def _context_keys(tokens: torch.Tensor, ctx: int, m: int) -> torch.Tensor:
    """(m,) int64 key of the contexts tokens[e : e + ctx], e = 0 .. m - 1 (two 31-bit hashes side by side)."""
    shifted = tokens + 1  # token 0 must change the hash too
    keys = []
    for prime, base in HASHES:
        h = torch.zeros(m, dtype=torch.int64, device=tokens.device)
        for j in range(ctx):  # in place: one pass over memory per step instead of three
            h.mul_(base).add_(shifted[j:j + m]).remainder_(prime)
        keys.append(h)
    return keys[0].mul_(HASHES[1][0]).add_(keys[1])


def _starts(first: torch.Tensor) -> torch.Tensor:
    """For a sorted array with group-start flags, the index of each element's group start."""
    idx = torch.arange(first.numel(), device=first.device)
    return torch.cummax(torch.where(first, idx, torch.zeros_like(idx)), 0).values


def _previous_in_group(values: torch.Tensor, first: torch.Tensor, fill: int) -> torch.Tensor:
    """Each element's predecessor in its group (`fill` for a group's first element)."""
    out = torch.empty_like(values)
    out[0] = fill
    out[1:] = values[:-1]
    return out.masked_fill(first, fill)


def _state_before(after: torch.Tensor, first: torch.Tensor, fill: int) -> torch.Tensor:
    """What a hint reads: its group's state as it was just before the hinted event was absorbed, i.e. the
    state after the previous event of the group. The one place that keeps a hint off its own label."""
    return _previous_in_group(after, first, fill)


def build_hints(tokens: torch.Tensor, order: int, threshold: float, beta: float, *,
                time: torch.Tensor | None = None, doc_start: torch.Tensor | None = None) -> NgramHints:
    """The token expert's hint for every target of `tokens` (1-D integer tensor, any device).

    Stream order by default. For an evaluator that scores in another order (phased LoRA TTT scores
    documents longest first, docs.py), `time` (n,) gives every target's place in that order: each
    context's counts then grow in that order, so a hint counts only labels of targets scored before its
    own, and its `evidence` is the target of the newest of them. `doc_start` (n,) gives each target's
    document start: a context reaching before it (into another document, scored at another time) never
    fires and is never counted."""
    if order < 2:
        raise ValueError(f"n-gram order {order} must be >= 2")
    tok = tokens.long()
    n = tok.numel() - 1  # targets
    device = tok.device
    # 12 bytes per target kept through scoring (int32: ids < 2^16, targets < 2^27)
    token = torch.zeros(max(n, 0), dtype=torch.int32, device=device)
    boost = torch.zeros(max(n, 0), dtype=torch.float32, device=device)
    evidence = torch.full((max(n, 0),), -1, dtype=torch.int32, device=device)
    hints = NgramHints(token, boost, evidence, order, threshold, beta)
    ctx = order - 1
    m = n - ctx + 1  # targets with a full context: k = ctx - 1 .. n - 1 (event e <-> target e + ctx - 1)
    if m < 2:
        return hints
    if m >= 1 << GROUP_SHIFT:
        raise ValueError(f"{m:,} n-gram events exceed the 2^{GROUP_SHIFT} this builder scans")

    # group the events by context, each group in stream order (stable sort), or in `time` order
    keys = _context_keys(tok, ctx, m)
    if doc_start is not None:  # contexts crossing a document start: unique negative keys, singleton groups
        k_of_e = torch.arange(ctx - 1, ctx - 1 + m, device=device)
        cross = (k_of_e - (ctx - 1)) < doc_start.to(device)[k_of_e]
        keys = torch.where(cross, -1 - torch.arange(m, device=device), keys)
    if time is not None:
        first_by_time = torch.sort(time.to(device)[ctx - 1:ctx - 1 + m], stable=True).indices
        sorted_keys, within = torch.sort(keys[first_by_time], stable=True)
        perm = first_by_time[within]
    else:
        sorted_keys, perm = torch.sort(keys, stable=True)
    del keys
    first = torch.ones(m, dtype=torch.bool, device=device)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    del sorted_keys
    group = torch.cumsum(first, 0) - 1
    idx = torch.arange(m, device=device)
    total = idx - _starts(first)  # events of the group before this one
    label = tok[ctx:ctx + m][perm]  # the next token of each event, in sorted order

    # inclusive count of (context, next token) pairs, by a second stable sort inside each group
    pair_keys, pair_perm = torch.sort(group * (int(tok.max()) + 1) + label, stable=True)
    pair_first = torch.ones(m, dtype=torch.bool, device=device)
    pair_first[1:] = pair_keys[1:] != pair_keys[:-1]
    del pair_keys
    count = torch.empty(m, dtype=torch.int64, device=device)
    count[pair_perm] = idx - _starts(pair_first) + 1
    del pair_perm, pair_first

    # the group's top count and top token after each event (a token takes the top only by passing it)
    offset = group << GROUP_SHIFT
    top_count = torch.cummax(offset + count, 0).values - offset
    del offset, count
    rose = top_count > _previous_in_group(top_count, first, 0)
    top_token = label[torch.cummax(torch.where(rose, idx, torch.full_like(idx, -1)), 0).values]
    del rose, label

    # the hint of each event reads its group's state BEFORE the event: targets < k only
    target = perm + (ctx - 1)
    total_f = total.clamp(min=1).to(torch.float32)
    seen = _state_before(target, first, -1)
    fires = (seen >= 0) & (_state_before(top_count, first, 0).to(torch.float32) / total_f
                           >= torch.tensor(threshold, dtype=torch.float32, device=device))
    chosen = target[fires]
    token[chosen] = _state_before(top_token, first, 0)[fires].to(torch.int32)
    boost[chosen] = beta
    evidence[chosen] = seen[fires].to(torch.int32)
    return hints


def check_same_on_all_ranks(hints: NgramHints, comm_device: torch.device) -> None:
    """Every rank built the same table (same stream prefix -> same hints), or raise before scoring."""
    if not dist.is_distributed():
        return
    fired = hints.evidence >= 0
    sig = torch.tensor([float(fired.sum()), float(hints.token[fired].double().sum()),
                        float(hints.evidence[fired].double().sum())], dtype=torch.float64, device=comm_device)
    both = dist.all_reduce_(torch.cat([sig, -sig]), "max")
    if not torch.equal(both[:3], -both[3:]):
        raise AssertionError(f"ranks built different n-gram hint tables ({sig.tolist()} here); the validation "
                             "tokens differ between ranks")
