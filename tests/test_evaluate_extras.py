"""The evaluator's extras end to end on CPU (the skip2 model of test_evaluate): the n-gram tilt, AsymLogit
and an eval context above the training context, under the score-first perturbation proof, the Tally's
checks, the compiled path's padded batches and two gloo ranks."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from pgolf import config as cfgmod
from pgolf.errors import ConfigError
from pgolf.evaluate import plan_chunks, plan_windows
from pgolf.evaluate.ngram import build_hints
from pgolf.evaluate.score import ScoreFirstViolation
from pgolf.model import build_model
from test_evaluate import SKIP2_EVAL, debug_cfg, make_val_dir, perturbed_from, run, skip2  # noqa: F401 (fixture)
from rank_fixtures import evaluate_on_two_ranks

# skip2's token i is a fixed function of token i-2 (90% of the time): 3-token contexts repeat, hints fire
TILT = dict(ngram_tilt_enabled=True, token_order=4)
ASYM = dict(asym_logit_rescale=True)
RUNS = {"plain-sliding": ({}, "sliding"), "tilt-sliding": (TILT, "sliding"), "asym-sliding": (ASYM, "sliding"),
        "plain-ttt": ({}, "ttt"), "both-ttt": ({**TILT, **ASYM}, "ttt")}


@pytest.fixture(scope="module")
def extras(skip2):  # noqa: F811
    return {name: run(skip2.cfg.with_overrides(**over), skip2.tmp, skip2.sd, mode, name=name)
            for name, (over, mode) in RUNS.items()}


def hinted_targets(tokens: np.ndarray) -> np.ndarray:
    return (build_hints(torch.from_numpy(tokens), 4, 0.8, 2.625).evidence >= 0).numpy()


def test_tilt_changes_exactly_the_hinted_targets(skip2, extras):  # noqa: F811
    plain, plain_nll = extras["plain-sliding"]
    tilt, tilt_nll = extras["tilt-sliding"]
    hinted = hinted_targets(skip2.tokens)
    assert tilt.ngram_hinted == hinted.sum() > 500 and plain.ngram_hinted == 0
    np.testing.assert_array_equal(tilt_nll[~hinted], plain_nll[~hinted])  # bit-identical off the hints
    assert (tilt_nll[hinted] != plain_nll[hinted]).mean() > 0.99
    assert tilt.targets == plain.targets and tilt.bytes == plain.bytes
    assert tilt.parts["ngram"] > 0 and "ngram" not in plain.parts  # the precompute is on the eval clock
    assert tilt.ngram_checks == 5 and plain.ngram_checks == 0  # the Tally checked each chunk's range
    # the audit file recomputes the tilted score, as for any other mode
    assert tilt_nll.astype(np.float64).sum() / (math.log(2) * tilt.bytes) == pytest.approx(tilt.val_bpb, rel=1e-9)


def test_asym_logit_is_the_cap_until_ttt_trains_it(skip2, extras):  # noqa: F811
    plain, plain_nll = extras["plain-sliding"]
    asym, asym_nll = extras["asym-sliding"]
    np.testing.assert_array_equal(asym_nll, plain_nll)  # identity at initialization, bit for bit
    assert (asym.softcap_pos, asym.softcap_neg) == (30.0, 30.0) and plain.softcap_pos == 0.0
    both, _ = extras["both-ttt"]
    assert both.ttt_steps == extras["plain-ttt"][0].ttt_steps
    assert both.softcap_pos != 30.0 and both.softcap_neg != 30.0  # moved by score-first TTT only
    summary = json.loads((skip2.tmp / "both-ttt" / "eval_summary.json").read_text())
    assert summary["softcap_pos"] == both.softcap_pos and summary["ngram_hinted"] == both.ngram_hinted


def breaches(skip2, tmp, base_nll: np.ndarray, cuts: list[int], overrides: dict,  # noqa: F811
             mode: str = "ttt") -> list[int]:
    """Cut points p where redrawing every token from p + 1 on changed the NLL of some target < p."""
    out = []
    for i, p in enumerate(cuts):
        data = make_val_dir(tmp / f"cut{p}", perturbed_from(skip2.tokens, p, seed=i), skip2.data / "tokenizer.model")
        result, nll = run(debug_cfg(data, **SKIP2_EVAL, **overrides), tmp, skip2.sd, mode, name=f"cut{p}")
        assert not np.array_equal(nll[p:], base_nll[p:]) and result.ngram_hinted > 0
        if not np.array_equal(nll[:p], base_nll[:p]):
            out.append(p)
    return out


def test_score_first_perturbation_with_tilt_and_asym(skip2, extras, tmp_path):  # noqa: F811
    """TTT + n-gram tilt + AsymLogit: the hints, the adapted caps and weights never see a later target."""
    both, base_nll = extras["both-ttt"]
    chunks = plan_chunks(plan_windows(len(skip2.tokens), 32, 8), 512)
    cuts = [chunks[1].lo, chunks[2].lo + 200, chunks[-1].lo, chunks[-1].lo + 100]
    assert breaches(skip2, tmp_path, base_nll, cuts, {**TILT, **ASYM}) == []


def test_hints_that_count_their_own_label_are_refused(skip2, tmp_path, monkeypatch):  # noqa: F811
    from pgolf.evaluate import ngram

    monkeypatch.setattr(ngram, "_state_before", lambda after, first, fill: after)  # read the state after the label
    with pytest.raises(ScoreFirstViolation, match="n-gram hint for target 2 counts the label of target 2"):
        run(skip2.cfg.with_overrides(**TILT), tmp_path, skip2.sd, "sliding")


def final_state(after: torch.Tensor, first: torch.Tensor, fill: int) -> torch.Tensor:
    """A leak: every hint reads its context's counts over the WHOLE stream, later targets included."""
    group = torch.cumsum(first, 0) - 1
    last = torch.nonzero(torch.cat([first[1:], torch.tensor([True])])).flatten()
    return after[last[group]]


def test_perturbation_check_catches_hints_that_look_ahead(skip2, tmp_path, monkeypatch):  # noqa: F811
    """The perturbation proof has teeth for the n-gram state too: with the Tally's check switched off, hints
    built from whole-stream counts change scores before the cut (and the Tally alone refuses them)."""
    from pgolf.evaluate import ngram
    from pgolf.evaluate.score import Tally

    monkeypatch.setattr(ngram, "_state_before", final_state)
    with pytest.raises(ScoreFirstViolation, match="counts the label of target"):
        run(skip2.cfg.with_overrides(**TILT), tmp_path, skip2.sd, "sliding", name="lookahead")
    monkeypatch.setattr(Tally, "require_causal_hints", lambda self, lo, hi, hints: None)
    _, leaky_nll = run(skip2.cfg.with_overrides(**TILT), tmp_path, skip2.sd, "sliding", name="lookahead")
    assert breaches(skip2, tmp_path, leaky_nll, [1200], TILT, mode="sliding") == [1200]


def test_compiled_path_pads_batches_with_tilt_and_asym(skip2, extras, tmp_path, monkeypatch):  # noqa: F811
    """Static shapes (padded rows, as on CUDA) gather hints for padded positions too and change nothing."""
    import pgolf.evaluate.core as core

    class StandIn:
        def __init__(self, purpose, fn):
            self.fn = fn

        def __call__(self, idx):
            return self.fn(idx)

    monkeypatch.setattr(core, "maybe_compiled", lambda purpose, fn, setting, device, **kw: StandIn(purpose, fn))
    monkeypatch.setattr(core, "is_compiled", lambda fn: isinstance(fn, StandIn))
    result, nll = run(skip2.cfg.with_overrides(**TILT, **ASYM), tmp_path, skip2.sd, "ttt")
    ref, ref_nll = extras["both-ttt"]
    assert result.parts["warmup"] > 0 and result.ngram_hinted == ref.ngram_hinted
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-4, atol=1e-5)


def test_asym_needs_a_cap_to_start_from():
    with pytest.raises(ConfigError, match="ASYM_LOGIT_RESCALE=1 starts from the model's cap, but LOGIT_SOFTCAP=0"):
        cfgmod.resolve("debug", {"asym_logit_rescale": True, "logit_softcap": 0}, env={})


# --- eval context above the training context (#1953: 2560 after training at 2048) ---------------------


def test_eval_context_longer_than_training_context(skip2, caplog):  # noqa: F811
    """EVAL_SEQ_LEN 80 > TRAIN_SEQ_LEN 64 (the 2560/2048 ratio): rows, windows and TTT sequences all take
    80 positions, RoPE is NTK-rescaled past ROPE_NTK_REF_LEN = 64, and every target is scored once."""
    cfg = skip2.cfg.with_overrides(eval_seq_len=80, rope_ntk_ref_len=64)
    assert cfg.train.train_seq_len == 64 and cfg.eval_seq_len == 80
    n = len(skip2.tokens) - 1
    caplog.set_level(logging.INFO, logger="pgolf.evaluate")
    for mode in ("rows", "sliding", "ttt"):
        result, nll = run(cfg, skip2.tmp, skip2.sd, mode, name=f"ctx80-{mode}")
        assert result.targets == n and result.seq_len == 80 and np.isfinite(nll).all() and (nll > 0).all()
    chunks = plan_chunks(plan_windows(n + 1, 80, 8), 512)
    seqs = [-(-(c.hi - c.lo) // 80) for c in chunks[:-1]]  # 80-token training sequences per adapted chunk
    assert result.ttt_steps == sum(-(-s // 8) for s in seqs) * 2
    dims = cfg.model.rope_dims
    base = 10000.0 * (80 / 64) ** (dims / (dims - 2))
    assert f"eval context 80 > training context 64: RoPE base NTK-rescaled to {base:g}" in caplog.text
    rotary = build_model(cfg.model).rotary
    cos, _ = rotary(80, torch.device("cpu"))
    inv = 1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims)
    torch.testing.assert_close(cos, torch.outer(torch.arange(80.0), inv).cos())
    cos64, _ = rotary(64, torch.device("cpu"))  # at or below the training context: the trained tables
    inv64 = 1.0 / 10000.0 ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims)
    torch.testing.assert_close(cos64, torch.outer(torch.arange(64.0), inv64).cos())


# --- two gloo ranks ------------------------------------------------------------------------------------


def test_two_gloo_ranks_with_tilt_and_asym_match_one(skip2, extras, tmp_path):  # noqa: F811
    """Each rank builds the whole stream's hint table (identical: checked across ranks) and scores its
    contiguous share of every chunk's windows, indexing hints by stream position, as #1514's kernel family."""
    wanted = {name: RUNS[name] for name in ("tilt-sliding", "both-ttt")}
    run_dir = evaluate_on_two_ranks(tmp_path, skip2.sd, skip2.cfg, wanted)
    for name, nll_tol, bpb_tol in (("tilt-sliding", 0.0, 0.0), ("both-ttt", 1e-4, 1e-6)):
        one, one_nll = extras[name]
        two = json.loads((run_dir / f"{name}.json").read_text())
        two_nll = np.load(run_dir / f"{name}.npz")["nll"]
        assert two["world_size"] == 2 and two["targets"] == one.targets and two["ngram_hinted"] == one.ngram_hinted
        assert two["ngram_checks"] > 0 and two["ttt_steps"] == one.ttt_steps
        assert np.abs(two_nll - one_nll).max() <= nll_tol, name
        assert abs(two["val_bpb"] - one.val_bpb) <= bpb_tol, (name, two["val_bpb"], one.val_bpb)
    assert json.loads((run_dir / "both-ttt.json").read_text())["softcap_pos"] == pytest.approx(
        extras["both-ttt"][0].softcap_pos, abs=1e-5)
