"""pgolf.evaluate.ngram and head: the n-gram hints against a plain online counter, causality, normalization
over the whole vocabulary (also over the realized target), the leak the Tally refuses, and AsymLogit."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from pgolf.evaluate import ngram
from pgolf.evaluate.head import AsymLogitHead, asym_softcap
from pgolf.evaluate.ngram import build_hints, tilt_logits
from pgolf.evaluate.score import ScoreFirstViolation, Tally, score_windows
from pgolf.evaluate.windows import Window


def online_reference(tokens: list[int], order: int, threshold: float) -> dict[int, tuple[int, int]]:
    """The token expert as an online state, one target at a time: hint first, then absorb the label.
    Returns {target: (hinted token, newest target counted)} for the targets where the hint fires."""
    ctx, stats, out = order - 1, {}, {}
    for k in range(ctx - 1, len(tokens) - 1):
        context = tuple(tokens[k - ctx + 1:k + 1])
        s = stats.setdefault(context, {"total": 0, "top": 0, "tok": 0, "counts": {}, "last": -1})
        if s["total"] and np.float32(s["top"]) / np.float32(s["total"]) >= np.float32(threshold):
            out[k] = (s["tok"], s["last"])
        label = tokens[k + 1]  # absorbed only now, after target k was hinted
        s["counts"][label] = s["counts"].get(label, 0) + 1
        s["total"] += 1
        s["last"] = k
        if s["counts"][label] > s["top"]:  # strictly: the first token to reach the top count keeps it
            s["top"], s["tok"] = s["counts"][label], label
    return out


def as_dict(h: ngram.NgramHints) -> dict[int, tuple[int, int]]:
    fired = torch.nonzero(h.evidence >= 0).flatten().tolist()
    return {k: (int(h.token[k]), int(h.evidence[k])) for k in fired}


def test_hints_by_hand():
    #         0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [7, 1, 2, 3, 1, 2, 4, 1, 2, 3, 1, 2]
    h = build_hints(torch.tensor(tokens), order=3, threshold=0.5, beta=2.0)
    # target k = tokens[k + 1], context tokens[k - 1 : k + 1]. Context (1, 2) precedes targets 2, 5, 8:
    # at 5 it has seen {3}: hint 3 (1/1); at 8 it has seen {3, 4}: 3 first reached the top count, 1/2.
    # (2, 3) precedes 3 and 9 (9 sees label 1 of target 3); (3, 1) precedes 4 and 10 (sees label 2).
    assert as_dict(h) == {5: (3, 2), 8: (3, 5), 9: (1, 3), 10: (2, 4)}
    assert h.boost[[5, 8, 9, 10]].tolist() == [2.0] * 4 and h.boost.sum() == 8.0 and h.fired == 4
    assert as_dict(build_hints(torch.tensor(tokens), order=3, threshold=0.6, beta=2.0)) == {5: (3, 2), 9: (1, 3),
                                                                                        10: (2, 4)}


@pytest.mark.parametrize("seed", range(6))
def test_hints_match_an_online_counter(seed):
    """Vectorized sorts and scans == the online state that hints first and absorbs after (ties: first wins)."""
    rng = np.random.default_rng(seed)
    for _ in range(8):
        vocab, order = int(rng.integers(2, 7)), int(rng.integers(2, 6))
        tokens = rng.integers(0, vocab, int(rng.integers(2, 600))).tolist()
        threshold = float(rng.choice([0.0, 0.34, 0.5, 0.8, 1.0]))
        h = build_hints(torch.tensor(tokens), order, threshold, beta=2.625)
        assert as_dict(h) == online_reference(tokens, order, threshold), (vocab, order, threshold)
        assert h.token.shape == h.boost.shape == (len(tokens) - 1,)


def test_short_streams_and_bad_order():
    assert build_hints(torch.tensor([3, 4]), 16, 0.8, 2.0).fired == 0
    # 19 targets; 14..18 have 15 tokens of context, 15..18 have also seen it before
    h = build_hints(torch.tensor([5] * 20), 16, 0.8, 2.0)
    assert h.fired == 4 and h.evidence[14:].tolist() == [-1, 14, 15, 16, 17] and h.token[15:].tolist() == [5] * 4
    with pytest.raises(ValueError, match="order 1"):
        build_hints(torch.tensor([1, 2, 3]), 1, 0.8, 2.0)


def redraw_from(tokens: np.ndarray, p: int, rng: np.random.Generator, vocab: int) -> np.ndarray:
    out = tokens.copy()
    out[p + 1:] = rng.integers(0, vocab, len(tokens) - p - 1)
    return out


def hint_leaks(rng: np.random.Generator, streams: int = 10, cuts: int = 20) -> int:
    """Cut points p where redrawing tokens[p+1:] (target p's own label and everything later) changed a
    hint of a target <= p; must be none."""
    leaks = 0
    for _ in range(streams):
        base = np.tile(rng.integers(0, 5, 7), 40)  # repetitive, so that most hints fire
        base[rng.random(base.size) < 0.3] = 5
        a = build_hints(torch.from_numpy(base), 4, 0.5, 2.0)
        for p in rng.integers(20, base.size - 2, cuts).tolist():
            b = build_hints(torch.from_numpy(redraw_from(base, p, rng, 6)), 4, 0.5, 2.0)
            leaks += not (torch.equal(a.token[:p + 1], b.token[:p + 1]) and torch.equal(a.boost[:p + 1], b.boost[:p + 1]))
    return leaks


def leak_own_label(monkeypatch):
    """The bug class of the within-word / word-start experts (#1967 audit): a hint that sees its own label.
    Here: the group state is read AFTER the event instead of before it."""
    monkeypatch.setattr(ngram, "_state_before", lambda values, first, fill: values)


def test_a_hint_depends_only_on_tokens_up_to_its_inputs(monkeypatch):
    assert hint_leaks(np.random.default_rng(0)) == 0
    leak_own_label(monkeypatch)
    assert hint_leaks(np.random.default_rng(0)) >= 10  # the check has teeth


def test_the_tally_refuses_hints_that_count_their_own_label(monkeypatch):
    tokens = torch.from_numpy(np.tile(np.arange(6), 30))
    tally = Tally(np.ones(tokens.numel() - 1, dtype=np.int64), keep_per_token=False)
    tally.require_causal_hints(0, 100, build_hints(tokens, 4, 0.8, 2.0))
    tally.require_causal_hints(0, 0, build_hints(tokens, 4, 0.8, 2.0))  # empty range: nothing to check
    assert tally.hint_checks == 1
    leak_own_label(monkeypatch)
    with pytest.raises(ScoreFirstViolation, match="hint for target 2 counts the label of target 2"):
        tally.require_causal_hints(0, 100, build_hints(tokens, 4, 0.8, 2.0))


def test_tilt_is_a_normalized_distribution():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 1024, dtype=torch.float64) * 4
    token = torch.randint(0, 1024, (3, 5))
    boost = torch.where(torch.rand(3, 5) < 0.5, 2.625, 0.0).double()
    tilted = tilt_logits(logits, token, boost)
    p = torch.softmax(tilted, -1)
    assert torch.allclose(p.sum(-1), torch.ones(3, 5, dtype=torch.float64), atol=1e-12)
    # the closed form of the PRs: -log p'(y) = -log p(y) - β·[y = h] + log1p(q_h·(e^β - 1))
    y = torch.randint(0, 1024, (3, 5))
    y[0, :] = token[0, :]  # some targets are the hint
    logp = torch.log_softmax(logits, -1)
    q = logp.gather(-1, token[..., None]).squeeze(-1).exp()
    closed = -logp.gather(-1, y[..., None]).squeeze(-1) - boost * (y == token) + torch.log1p(q * torch.expm1(boost))
    assert torch.allclose(-torch.log_softmax(tilted, -1).gather(-1, y[..., None]).squeeze(-1), closed, atol=1e-10)
    assert torch.equal(tilted[boost == 0], logits[boost == 0])  # no hint: the logits are untouched
    inplace = logits.clone()
    assert torch.equal(tilt_logits(inplace, token, boost, inplace=True), tilted) and torch.equal(inplace, tilted)


class BigramModel(torch.nn.Module):
    """A fixed causal model_fn: logits of position t from token t alone."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1)) * 3

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


# target 33's context (7, 8, 9) was always followed by 5 (the hint fires); target 42's (20, 21, 22) is new
STREAM = np.concatenate([np.tile([5, 6, 7, 8, 9], 8), [20, 21, 22, 23, 24]])


def mass_over_the_realized_target(p: int, vocab: int = 64) -> float:
    """Σ_y P(target p = y), each term scored by the real scoring path on the stream whose label p is y."""
    model = BigramModel(vocab)
    total = 0.0
    for y in range(vocab):
        t = STREAM.copy()
        t[p + 1] = y
        tokens = torch.from_numpy(t)
        hints = build_hints(tokens, 4, 0.8, 2.625)
        with torch.no_grad():
            nll = score_windows(model, tokens, [Window(p - 9, p, p + 1)], 10, 4, 1.0, True, hints=hints)
        total += math.exp(-float(nll[0]))
    return total


def test_scored_distribution_is_normalized_over_the_realized_target(monkeypatch):
    """Issue #1017 C2 end to end through score_windows: the distribution at p does not depend on its label."""
    for p in (33, 42):
        assert build_hints(torch.from_numpy(STREAM), 4, 0.8, 2.625).boost[p] == (2.625 if p == 33 else 0.0)
        assert mass_over_the_realized_target(p) == pytest.approx(1.0, abs=1e-5)
    leak_own_label(monkeypatch)
    assert mass_over_the_realized_target(42) > 2  # a hint that reads its own label boosts whatever comes


def test_asym_softcap_is_the_cap_until_trained():
    z = torch.randn(4, 7, 33) * 40
    cap = torch.tensor(30.0)
    assert torch.equal(asym_softcap(z, cap, cap), 30.0 * torch.tanh(z / 30.0))
    pos, neg = torch.tensor(20.0, requires_grad=True), torch.tensor(45.0, requires_grad=True)
    out = asym_softcap(z, pos, neg)
    assert torch.allclose(out, torch.where(z > 0, 20 * torch.tanh(z / 20), 45 * torch.tanh(z / 45)))
    assert out.max() < 20 and out.min() > -45
    (out * (z > 0)).sum().backward()  # only positive logits reach s₊
    assert pos.grad.abs() > 0 and neg.grad == 0
    head = AsymLogitHead(torch.nn.Linear(3, 5), 30.0)
    assert [n for n, _ in head.named_parameters(recurse=False)] == ["softcap_pos", "softcap_neg"]
    assert not head.softcap_pos.requires_grad and float(head.softcap_neg) == 30.0
    with pytest.raises(ValueError, match="positive LOGIT_SOFTCAP"):
        AsymLogitHead(torch.nn.Linear(3, 5), 0.0)


RANKS_DIFFER = """
import sys, torch, torch.distributed as dist
from pgolf.evaluate.ngram import build_hints, check_same_on_all_ranks
dist.init_process_group("gloo")
tokens = torch.tensor([1, 2, 3] * 20 + [dist.get_rank()] * 3)
same = build_hints(torch.tensor([1, 2, 3] * 20), 3, 0.8, 2.0)
check_same_on_all_ranks(same, torch.device("cpu"))
try:
    check_same_on_all_ranks(build_hints(tokens, 3, 0.8, 2.0), torch.device("cpu"))
except AssertionError as e:
    open(sys.argv[1] + f".rank{dist.get_rank()}", "w").write(f"refused: {e}")
dist.destroy_process_group()
"""


def test_ranks_with_different_streams_are_refused(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_DIFFER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # each rank writes its own file: two processes' prints into one pipe are not reliably both captured
    for rank in (0, 1):
        assert (tmp_path / f"out.rank{rank}").read_text().startswith("refused: ranks built different n-gram hint tables")
