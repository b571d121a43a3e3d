"""EVAL_MODE=lora_ttt end to end on CPU: phased per-document LoRA TTT with global SGD phases, the n-gram tilt
and AsymLogit, on the skip2 model of test_evaluate.

The validation stream here is made of documents ([BOS] + a skip2 run), each with its OWN variant of the
skip2 permutation (8 of 32 entries changed), so the base model is wrong in a document-specific way and
per-document adaptation has something to learn. Score-first is proven in the order the evaluator scores
(docs.score_time: batch, step, document, position): redrawing every label from a point of that order on
leaves every earlier score bit-identical, with LoRA state, phases, hints and AsymLogit caps all in play.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pgolf.data.bpb import val_target_bytes
from pgolf.evaluate.docs import DocPlan, plan_documents, score_time
from pgolf.evaluate.score import ScoreFirstViolation
from pgolf.model import BOS_ID
from test_evaluate import SKIP2_IDS, debug_cfg, make_val_dir, run, skip2, skip2_stream  # noqa: F401 (fixture)
from rank_fixtures import evaluate_on_two_ranks

LORA = dict(eval_mode="lora_ttt", eval_seq_len=64, ttt_lora_rank=4, ttt_lora_alpha=8.0, ttt_lora_chunk=16,
            ttt_lora_short_chunks="200:8", ttt_lora_doc_batch=4, ttt_lora_lr=1e-2, ttt_phases=2,
            ttt_phase_prefix_docs=8, ttt_phase_batch_seqs=4, ttt_phase_lr=1e-3)
EXTRAS = dict(ngram_tilt_enabled=True, token_order=4, asym_logit_rescale=True)


def doc_stream(perm: np.ndarray, n: int = 3_000, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < n:
        p = perm.copy()
        swap = rng.choice(len(perm), 8, replace=False)
        p[swap] = p[np.roll(swap, 1)]
        parts.append(np.concatenate([[BOS_ID], skip2_stream(int(rng.integers(150, 400)), p, int(rng.integers(1e6)),
                                                            noise=0.05)]))
        total += len(parts[-1])
    return np.concatenate(parts)[:n]


@pytest.fixture(scope="module")
def docs(skip2, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("docs")
    tokens = doc_stream(skip2.perm)
    data = make_val_dir(tmp / "data", tokens, skip2.data / "tokenizer.model")
    cfg = debug_cfg(data, **LORA)
    plan = plan_documents(tokens, doc_batch=4, chunk=16, short_chunks="200:8", prefix_docs=8, phases=2)
    return SimpleNamespace(tmp=tmp, data=data, cfg=cfg, sd=skip2.sd, tokens=tokens, plan=plan, time=score_time(plan))


@pytest.fixture(scope="module")
def results(docs):
    runs = {"lora": {}, "full": EXTRAS, "frozen": dict(ttt_lora_lr=0.0, ttt_phases=0)}
    return {name: run(docs.cfg.with_overrides(**over), docs.tmp, docs.sd, "lora_ttt", name=name)
            for name, over in runs.items()}


# --- exact bpb: every target once, bytes from the sidecar/LUT, the audit recomputes the score ---------


@pytest.mark.parametrize("name", ["lora", "full", "frozen"])
def test_every_target_scored_once_with_exact_bytes(docs, results, name):
    result, nll = results[name]
    n = len(docs.tokens) - 1
    assert result.mode == "lora_ttt" and result.targets == result.expected_targets == n
    assert np.isfinite(nll).all() and (nll > 0).all()  # every target written, none left at 0
    audit = np.load(docs.tmp / f"{name}-lora_ttt.npz")
    expected = val_target_bytes(docs.data, docs.tokens, docs.data / "tokenizer.model")
    assert (audit["bytes"] == expected).all() and result.bytes == int(expected.sum())
    assert nll.astype(np.float64).sum() / (math.log(2) * expected.sum()) == pytest.approx(result.val_bpb, rel=1e-9)
    assert result.docs == docs.plan.n_docs == 10 and result.doc_batches == 3
    summary = json.loads((docs.tmp / name / "eval_summary.json").read_text())
    assert summary["mode"] == "lora_ttt" and summary["phases_run"] == result.phases_run
    # one batched step per step of a batch with a document whose chunk is not its last (lr 0: no-op steps)
    steps = sum(int(docs.plan.n_chunks(b).max()) - 1 for b in docs.plan.batches)
    assert result.ttt_steps == steps and result.lora_doc_steps == int((docs.plan.n_chunks(np.arange(10)) - 1).sum())
    if name == "frozen":
        assert result.phases_run == 0
    else:
        assert result.phases_run == 2 and result.phase_steps > 0 and result.parts["phase"] > 0
        assert result.score_first_checks == result.ttt_steps + result.phases_run


def test_lora_ttt_adapts_to_each_document(results):
    frozen, _ = results["frozen"]
    lora, _ = results["lora"]
    assert lora.val_bpb < frozen.val_bpb - 0.1, (lora.val_bpb, frozen.val_bpb)  # measured 1.10 vs 1.35


def test_without_adaptation_each_chunk_is_scored_on_its_documents_window(docs, results):
    """lr 0, no phases: target t is scored by the base model on its document's last <= 64 tokens ending at
    the end of t's chunk (the window rule of spec §5.2), checked against a direct forward per chunk."""
    from pgolf.model import build_model

    _, nll = results["frozen"]
    model = build_model(docs.cfg.model, "cpu")
    model.load_state_dict(docs.sd)
    model.eval()
    toks = torch.from_numpy(docs.tokens)
    checked = 0
    for d in (0, 5, 9):
        for step in range(int(docs.plan.n_chunks(np.array([d]))[0])):
            a, b = docs.plan.chunk_span(d, step)
            s = max(int(docs.plan.lo[d]), b - 64)
            with torch.no_grad():
                ref = model.per_token_nll(toks[s:b][None], toks[s + 1:b + 1][None])[0, a - s:]
            np.testing.assert_allclose(nll[a:b], ref.numpy(), rtol=1e-5, atol=1e-6)
            checked += b - a
    assert checked > 500


def test_tilt_and_asym_ride_on_the_scoring_path(docs, results):
    full, _ = results["full"]
    lora, _ = results["lora"]
    assert full.ngram_hinted > 100 and full.ngram_checks > 0 and lora.ngram_hinted == 0
    assert (full.softcap_pos, full.softcap_neg) != (30.0, 30.0)  # moved only by the global phases (SGD, lr 1e-3)
    assert full.val_bpb < lora.val_bpb and full.parts["ngram"] > 0


# --- score-first, in score order ------------------------------------------------------------------


def redraw_after(tokens: np.ndarray, time: np.ndarray, tau: int, seed: int) -> np.ndarray:
    """Every label of a target scored at or after `tau` redrawn (BOS labels kept: the documents stay put)."""
    rng = np.random.default_rng(seed)
    out = tokens.copy()
    labels = np.flatnonzero(time >= tau) + 1
    labels = labels[tokens[labels] != BOS_ID]
    out[labels] = rng.choice(SKIP2_IDS, size=labels.size)
    return out


def cut_times(docs) -> list[int]:
    plan, time = docs.plan, docs.time
    def at(batch: int, step: int, slot: int) -> int:
        a, _ = plan.chunk_span(int(plan.batches[batch][slot]), step)
        return int(time[a])
    # right after the first phase; mid batch 1 (a document's 4th chunk); inside the last batch
    return [at(1, 0, 0), at(1, 3, 2), at(2, 5, 1)]


def score_first_breaches(docs, tmp, base_nll: np.ndarray, overrides: dict, cuts: list[int]) -> list[int]:
    out = []
    for i, tau in enumerate(cuts):
        data = make_val_dir(tmp / f"cut{tau}", redraw_after(docs.tokens, docs.time, tau, seed=i),
                            docs.data / "tokenizer.model")
        _, nll = run(debug_cfg(data, **LORA, **overrides), tmp, docs.sd, "lora_ttt", name=f"cut{tau}")
        before = docs.time < tau
        assert not np.array_equal(nll[~before], base_nll[~before])  # the redraw reached the scores
        if not np.array_equal(nll[before], base_nll[before]):
            out.append(tau)
    return out


def test_score_first_perturbation_in_score_order(docs, results, tmp_path):
    """LoRA (warm A), two global phases, n-gram hints and AsymLogit caps: no earlier score moves."""
    _, base_nll = results["full"]
    assert score_first_breaches(docs, tmp_path, base_nll, EXTRAS, cut_times(docs)) == []


def _phase_one_batch_ahead(monkeypatch):
    """An illegal evaluator: each phase also trains on the batch after its boundary (not scored yet)."""
    real = DocPlan.docs_before_phase

    def ahead(self, phase):
        return np.concatenate([real(self, phase), self.batches[self.phase_ends[phase] + 1]])

    monkeypatch.setattr(DocPlan, "docs_before_phase", ahead)


def test_a_phase_on_unscored_documents_is_refused(docs, tmp_path, monkeypatch):
    _phase_one_batch_ahead(monkeypatch)
    with pytest.raises(ScoreFirstViolation, match="of their document are scored"):
        run(docs.cfg, tmp_path, docs.sd, "lora_ttt")


def test_perturbation_catches_a_leaky_phase(docs, tmp_path, monkeypatch):
    """The proof has teeth: with the DocTally's check off, the phase that saw batch 1 moves batch 1's scores."""
    from pgolf.evaluate.score import DocTally

    _phase_one_batch_ahead(monkeypatch)
    monkeypatch.setattr(DocTally, "require_scored", lambda self, spans: None)
    _, leaky = run(docs.cfg, tmp_path, docs.sd, "lora_ttt", name="leaky")
    tau = cut_times(docs)[1]  # mid batch 1: its first chunks were scored after training on all of it
    assert score_first_breaches(docs, tmp_path, leaky, {}, [tau]) == [tau]


def test_a_lora_step_before_its_chunk_is_committed_is_refused(docs, tmp_path, monkeypatch):
    from pgolf.evaluate.score import DocTally

    monkeypatch.setattr(DocTally, "commit_doc", lambda self, doc, lo, hi: None)
    with pytest.raises(ScoreFirstViolation, match="TTT would train on targets"):
        run(docs.cfg, tmp_path, docs.sd, "lora_ttt")


def test_stream_order_hints_are_refused_in_score_order(docs, tmp_path, monkeypatch):
    """#2135's stream-prefix hints would let a document scored early count labels of documents scored later."""
    import pgolf.evaluate.core as core

    real = core.build_hints
    monkeypatch.setattr(core, "build_hints", lambda tokens, o, t, b, **kw: real(tokens, o, t, b))
    with pytest.raises(ScoreFirstViolation, match="which is not scored before it"):
        run(docs.cfg.with_overrides(**EXTRAS), tmp_path, docs.sd, "lora_ttt")


# --- the budget guard, the compiled path, two ranks ----------------------------------------------------


def test_guard_stops_adapting_and_still_scores_everything(docs, results, tmp_path):
    result, nll = run(docs.cfg.with_overrides(eval_max_seconds=1e-3), tmp_path, docs.sd, "lora_ttt")
    assert result.guard_fired and "LoRA TTT stopped" in result.guard_reason
    assert result.targets == len(docs.tokens) - 1 and np.isfinite(nll).all()
    assert 0 < result.ttt_steps < results["lora"][0].ttt_steps and result.phases_run == 0


def test_compiled_path_pads_widths_and_warms_up_on_random_tokens(docs, results, tmp_path, monkeypatch):
    """Static shapes as on CUDA: windows padded to a few widths (<= planned graphs per wrapper), every
    width warmed on random tokens before validation, and the scores unchanged by the padding."""
    import pgolf.evaluate.core as core
    from pgolf.model.compiled import call_signature

    calls: list[tuple[str, int, tuple, torch.Tensor]] = []

    class StandIn:
        def __init__(self, purpose, fn, planned):
            self.purpose, self.fn, self.planned = purpose, fn, planned

        def __call__(self, idx):
            calls.append((self.purpose, self.planned, tuple(sorted(call_signature((idx,), {}).items())),
                          idx.detach().clone()))
            return self.fn(idx)

    monkeypatch.setattr(core, "compile_enabled", lambda setting, device: True)
    monkeypatch.setattr(core, "maybe_compiled",
                        lambda purpose, fn, setting, device, planned=1, **kw: StandIn(purpose, fn, planned))
    result, nll = run(docs.cfg.with_overrides(**EXTRAS), tmp_path, docs.sd, "lora_ttt")
    assert {p for p, *_ in calls} == {"lora_ttt", "phase_step"}
    for purpose in ("lora_ttt", "phase_step"):
        sigs = {sig for p, _, sig, _ in calls if p == purpose}
        planned = next(n for p, n, _, _ in calls if p == purpose)
        assert len(sigs) <= planned, (purpose, sigs)
    warm = [x for p, _, _, x in calls[:2]]  # widths 64 (= EVAL_SEQ_LEN): one lora forward, one phase forward
    assert all(not set(x.unique().tolist()) <= set(SKIP2_IDS.tolist()) | {BOS_ID} for x in warm)
    assert result.parts["warmup"] > 0 and result.ttt_steps == results["full"][0].ttt_steps
    np.testing.assert_allclose(nll, results["full"][1], rtol=1e-4, atol=1e-5)


def test_two_gloo_ranks(docs, results, tmp_path):
    """Batches go round-robin to the ranks and the phases are collective. Without warm-start A a batch's
    scores do not depend on which rank ran the batch before it, so two ranks match one; with it, every
    target is still scored once and the score stays close."""
    wanted = {"cold": {**EXTRAS, "ttt_lora_warm_start_a": False}, "full": EXTRAS}
    run_dir = evaluate_on_two_ranks(tmp_path, docs.sd, docs.cfg,
                                    {name: (over, "lora_ttt") for name, over in wanted.items()})
    cold_one, cold_one_nll = run(docs.cfg.with_overrides(**wanted["cold"]), tmp_path, docs.sd, "lora_ttt", name="cold")
    full_one = results["full"][0]
    for name, one, tol in (("cold", cold_one, 1e-6), ("full", full_one, 0.02)):
        two = json.loads((run_dir / f"{name}.json").read_text())
        assert two["world_size"] == 2 and two["targets"] == one.targets and two["bytes"] == one.bytes
        assert two["ttt_steps"] == one.ttt_steps and two["phases_run"] == 2 and two["ngram_hinted"] == one.ngram_hinted
        assert abs(two["val_bpb"] - one.val_bpb) <= tol, (name, two["val_bpb"], one.val_bpb)
    two_nll = np.load(run_dir / "cold.npz")["nll"]
    assert np.abs(two_nll - cold_one_nll).max() <= 1e-4


# --- the frontier-debug preset on CaseOps data: bytes from the sidecar ------------------------------------


def test_frontier_debug_preset_scores_original_bytes_through_the_sidecar(offline_caseops_data, tmp_path):
    """`frontier-debug`'s own eval knobs (lora_ttt, no Q/V, short-document chunks, one phase, tilt, AsymLogit,
    context 2 x training) on a cut of the CaseOps validation stream: the byte total is the sidecar's."""
    from pgolf import config as cfgmod
    from pgolf.data.shards import read_shard, write_shard
    from pgolf.evaluate import evaluate
    from pgolf.model import build_model

    tokens = np.asarray(read_shard(offline_caseops_data / "fineweb_val_000000.bin"))[:12_000]
    sidecar = np.asarray(read_shard(offline_caseops_data / "fineweb_val_bytes_000000.bin"))[:12_000]
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "fineweb_val_000000.bin", tokens)
    write_shard(data / "fineweb_val_bytes_000000.bin", sidecar)
    cfg = cfgmod.resolve("frontier-debug", {"data_path": str(data),
                                            "tokenizer_path": str(offline_caseops_data / "tokenizer.model")}, env={})
    assert cfg.eval.eval_mode == "lora_ttt" and cfg.eval_seq_len == 2 * cfg.train.train_seq_len
    torch.manual_seed(0)
    sd = build_model(cfg.model).state_dict()
    result = evaluate(cfg, tmp_path / "run", per_token_out=tmp_path / "audit.npz", state_dict_loader=lambda _: sd)
    n_docs = int((tokens[:-1] == BOS_ID).sum()) + (tokens[0] != BOS_ID)
    assert result.mode == "lora_ttt" and result.docs == n_docs and result.targets == len(tokens) - 1
    assert result.bytes == int(sidecar[1:].sum()) and result.phases_run == 1 and result.ngram_hinted > 0
    audit = np.load(tmp_path / "audit.npz")
    assert (audit["bytes"] == sidecar[1:]).all() and (audit["nll"] > 0).all()
