"""The pieces of phased LoRA TTT, by hand: the document plan and score order (docs.py), the batched LoRA
and its per-document AdamW (lora.py), n-gram hints in score order (ngram.py), the DocTally (score.py) and
the closed-form tilt of the scored NLL (phased.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_fixtures import SMALL, perturbed, tokens
from pgolf import config as cfgmod
from pgolf.errors import ConfigError
from pgolf.evaluate.docs import cut_documents, parse_short_chunks, plan_documents, score_time
from pgolf.evaluate.lora import BatchedAdamW, BatchedLoRA, parse_sites, site_dims
from pgolf.evaluate.ngram import build_hints, tilt_logits
from pgolf.evaluate.score import DocTally, ScoreFirstViolation
from pgolf.model.adapters import HEAD_SLOT, SITES

# --- documents -------------------------------------------------------------------------------------


def test_documents_by_hand():
    #          0  1  2  3  4  5  6  7  8  9
    stream = [5, 1, 7, 8, 1, 9, 1, 1, 4, 6]  # 9 targets; BOS at 1, 4, 6, 7
    lo, hi = cut_documents(np.array(stream))
    # a leading document [0, 1) (no BOS before it), then each BOS up to (and including) the next BOS as label
    assert lo.tolist() == [0, 1, 4, 6, 7] and hi.tolist() == [1, 4, 6, 7, 9]
    assert stream[hi[1]] == 1  # document 1's last target is the next document's BOS
    lo, hi = cut_documents(np.array([1, 3, 3, 1, 2]))
    assert lo.tolist() == [0, 3] and hi.tolist() == [3, 4]  # the stream's first token is never a target


def test_plan_sorts_longest_first_and_places_phases():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, 23)
    stream = np.concatenate([np.concatenate([[1], rng.integers(2, 50, n - 1)]) for n in lengths] + [[1]])
    plan = plan_documents(stream, doc_batch=4, chunk=8, prefix_docs=10, phases=3)
    assert plan.n_docs == 23 and plan.n_targets == len(stream) - 1
    assert (plan.hi - plan.lo).tolist() == lengths.tolist()  # doc j: its BOS .. the next BOS
    order = np.concatenate(plan.batches)
    assert sorted(order.tolist()) == list(range(23)) and [len(b) for b in plan.batches] == [4] * 5 + [3]
    sizes = (plan.hi - plan.lo)[order]
    assert (np.diff(sizes) <= 0).all()  # longest first
    # prefix 10 docs -> 3 batches; phases after batches round(3 j / 3) - 1 = 0, 1, 2
    assert plan.phase_ends == [0, 1, 2]
    assert plan.docs_before_phase(1).tolist() == order[:8].tolist()
    assert plan_documents(stream, doc_batch=4, chunk=8, prefix_docs=10, phases=1).phase_ends == [2]
    assert plan_documents(stream, doc_batch=4, chunk=8, prefix_docs=10_000, phases=1).phase_ends == []  # after the last batch
    assert plan_documents(stream, doc_batch=4, chunk=8, prefix_docs=10, phases=0).phase_ends == []
    assert plan.batches_of(1, 2) == [1, 3, 5]


def test_short_document_chunks():
    assert parse_short_chunks("2000:24, 256:8") == [(256, 8), (2000, 24)]
    stream = np.concatenate([[1] + [5] * (n - 1) for n in (300, 100, 3000)] + [[1]])
    plan = plan_documents(stream, doc_batch=2, chunk=48, short_chunks="256:8,2000:24")
    assert plan.chunk.tolist() == [24, 8, 48]
    assert plan.chunk_span(1, 0) == (300, 308) and plan.chunk_span(1, 12) == (396, 400)
    assert plan.chunk_span(1, 13) == (400, 400)  # past its last chunk: empty
    with pytest.raises(ConfigError, match="DOC_LEN:CHUNK"):
        parse_short_chunks("256")


def test_score_time_is_the_processing_order():
    rng = np.random.default_rng(1)
    stream = np.concatenate([np.concatenate([[1], rng.integers(2, 50, n - 1)]) for n in rng.integers(1, 40, 9)])
    plan = plan_documents(stream, doc_batch=3, chunk=5, short_chunks="6:2")
    time = score_time(plan)
    assert np.unique(time).size == time.size  # a total order
    # the order a reader of the loop would write down: batch, step, document in batch, position
    expect = []
    for docs in plan.batches:
        for step in range(int(plan.n_chunks(docs).max())):
            for d in docs:
                a, b = plan.chunk_span(int(d), step)
                expect.extend(range(a, b))
    assert np.argsort(time, kind="stable").tolist() == expect


# --- the batched LoRA ----------------------------------------------------------------------------------


def test_lora_starts_as_the_base_model_and_covers_every_slot():
    model = perturbed(SMALL)
    lora = BatchedLoRA(model, SITES, docs=2, rank=4, alpha=8.0)
    assert lora.scale == 2.0
    assert set(lora.a) == {(s, site) for s in range(model.num_slots) for site in SITES if site != "head"} | {(HEAD_SLOT, "head")}
    for (slot, site), a in lora.a.items():
        n_in, n_out = site_dims(model, site)
        assert a.shape == (2, 4, n_in) and lora.b[(slot, site)].shape == (2, n_out, 4)
        assert a.abs().max() <= 1 / n_in ** 0.5 and torch.equal(a[0], a[1])  # one U(±1/√in) draw, shared
    idx = tokens(batch=2)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, adapter=lora), model(idx), rtol=0, atol=0)
    assert lora.num_params_per_doc() == sum(4 * sum(site_dims(model, s)) for s in SITES[:-1]) * model.num_slots \
        + 4 * sum(site_dims(model, "head"))
    assert parse_sites("k, o,mlp,head") == ("k", "o", "mlp", "head")
    with pytest.raises(ConfigError, match="TTT_LORA_SITES"):
        parse_sites("q,x")


def test_each_document_trains_only_its_own_weights():
    model = perturbed(SMALL).requires_grad_(False)
    lora = BatchedLoRA(model, ("k", "mlp", "head"), docs=3, rank=2, alpha=4.0)
    with torch.no_grad():
        for t in lora.b.values():
            t.normal_()  # a non-zero B, so A gets gradients too
    idx = tokens(batch=3)
    nll = model(idx, tokens(batch=3, seed=1), reduction="none", adapter=lora)
    nll[1].mean().backward()  # only document 1's loss
    for t in lora.parameters():
        assert t.grad[1].abs().sum() > 0 and t.grad[0].abs().sum() == 0 and t.grad[2].abs().sum() == 0


def test_batched_adamw_is_adamw_per_document_and_masks_finished_ones():
    torch.manual_seed(0)
    p = torch.randn(3, 4, 5, requires_grad=True)
    ref = [torch.nn.Parameter(p[i].detach().clone()) for i in range(3)]
    opt = BatchedAdamW([p], lr=1e-2, betas=(0.0, 0.99), eps=1e-10, weight_decay=0.5)
    refs = [torch.optim.AdamW([r], lr=1e-2, betas=(0.0, 0.99), eps=1e-10, weight_decay=0.5) for r in ref]
    masks = [[1, 1, 1], [1, 0, 1], [1, 0, 1], [0, 0, 1]]
    for k, mask in enumerate(masks):
        g = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(k))
        p.grad = g.clone()
        opt.step(torch.tensor(mask, dtype=torch.bool))
        for i in range(3):
            if mask[i]:
                ref[i].grad = g[i].clone()
                refs[i].step()
    for i in range(3):
        torch.testing.assert_close(p[i].detach(), ref[i].detach(), rtol=1e-6, atol=1e-7)
    assert opt.steps.tolist() == [3.0, 1.0, 4.0]
    opt.reset()
    assert opt.steps.sum() == 0 and opt.v[0].abs().sum() == 0


def test_reset_zeroes_b_and_keeps_a_warm_unless_told():
    model = perturbed(SMALL)
    for warm in (True, False):
        lora = BatchedLoRA(model, ("o",), docs=2, rank=2, alpha=2.0, warm_start_a=warm)
        with torch.no_grad():
            for t in lora.parameters():
                t.add_(1.0)
        trained_a = {k: v.detach().clone() for k, v in lora.a.items()}
        lora.reset()
        assert all(t.abs().sum() == 0 for t in lora.b.values())
        for k, a in lora.a.items():
            assert torch.equal(a, trained_a[k] if warm else lora.a_init[k].expand_as(a))
        lora.reset(fresh_a=True)  # after a global phase
        assert all(torch.equal(a, lora.a_init[k].expand_as(a)) for k, a in lora.a.items())


# --- n-gram hints in score order, and the DocTally ------------------------------------------------------


def ordered_reference(tokens: list[int], order: int, threshold: float, time: list[int],
                      doc_start: list[int]) -> dict[int, tuple[int, int]]:
    """The online token expert, fed targets in `time` order; contexts must lie inside the target's document."""
    ctx, stats, out = order - 1, {}, {}
    for k in sorted(range(ctx - 1, len(tokens) - 1), key=lambda k: time[k]):
        if k - ctx + 1 < doc_start[k]:
            continue
        s = stats.setdefault(tuple(tokens[k - ctx + 1:k + 1]), {"total": 0, "top": 0, "tok": 0, "counts": {}, "last": -1})
        if s["total"] and np.float32(s["top"]) / np.float32(s["total"]) >= np.float32(threshold):
            out[k] = (s["tok"], s["last"])
        label = tokens[k + 1]
        s["counts"][label] = s["counts"].get(label, 0) + 1
        s["total"] += 1
        s["last"] = k
        if s["counts"][label] > s["top"]:
            s["top"], s["tok"] = s["counts"][label], label
    return out


@pytest.mark.parametrize("seed", range(4))
def test_hints_in_score_order_match_an_online_counter_in_that_order(seed):
    rng = np.random.default_rng(seed)
    stream = np.concatenate([np.concatenate([[1], rng.integers(2, 5, n - 1)]) for n in rng.integers(2, 50, 12)])
    plan = plan_documents(stream, doc_batch=3, chunk=4)
    time = score_time(plan)
    doc_start = np.repeat(plan.lo, plan.hi - plan.lo)
    h = build_hints(torch.from_numpy(stream), 3, 0.5, 2.0, time=torch.from_numpy(time),
                    doc_start=torch.from_numpy(doc_start))
    fired = torch.nonzero(h.evidence >= 0).flatten().tolist()
    got = {k: (int(h.token[k]), int(h.evidence[k])) for k in fired}
    assert got == ordered_reference(stream.tolist(), 3, 0.5, time.tolist(), doc_start.tolist()) and len(got) > 20
    tally = DocTally(np.ones(plan.n_targets, np.int64), False, plan.lo, plan.hi)
    all_targets = torch.arange(plan.n_targets)
    tally.require_causal_hints_in_order(all_targets, h, torch.from_numpy(time))
    stream_order = build_hints(torch.from_numpy(stream), 3, 0.5, 2.0)  # #2135's stream-prefix hints
    with pytest.raises(ScoreFirstViolation, match="which is not scored before it"):
        tally.require_causal_hints_in_order(all_targets, stream_order, torch.from_numpy(time))


def test_doc_tally_commits_per_document_and_checks_spans():
    lo, hi = np.array([0, 5, 9]), np.array([5, 9, 12])
    tally = DocTally(np.arange(12), True, lo, hi)
    tally.add_targets(np.array([5, 6]), np.array([1.0, 2.0]))
    tally.commit_doc(1, 5, 7)
    assert (tally.count, tally.byte_sum, tally.nll_sum) == (2, 11, 3.0) and tally.per_token[6] == 2.0
    tally.require_scored([(5, 7), (6, 7)])
    for bad, msg in (((5, 8), "only \\[5, 7\\) of their document"), ((0, 1), "only \\[0, 0\\)"), ((6, 10), "only \\[5, 7\\)")):
        with pytest.raises(ScoreFirstViolation, match=msg):
            tally.require_scored([bad])
    with pytest.raises(ScoreFirstViolation, match="does not extend"):
        tally.commit_doc(1, 5, 7)  # scoring a chunk twice
    with pytest.raises(ScoreFirstViolation, match="does not extend"):
        tally.commit_doc(2, 10, 12)  # skipping a target
    other = np.array([3, 5, 12])  # what another rank committed
    tally.merge(lambda t: torch.maximum(t, torch.from_numpy(other)))
    assert tally.upto.tolist() == [3, 7, 12]


# --- the scored NLL with the tilt, in closed form ----------------------------------------------------


def test_closed_form_tilt_equals_the_tilted_softmax():
    from pgolf.evaluate.phased import PhasedLoRA

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 50, generator=g) * 3
    y = torch.randint(0, 50, (2, 7), generator=g)
    token = torch.where(torch.rand(2, 7, generator=g) < 0.5, y, torch.randint(0, 50, (2, 7), generator=g))
    boost = torch.where(torch.rand(2, 7, generator=g) < 0.7, 2.625, 0.0)

    class Hints:
        def at(self, t):
            return token.flatten()[t], boost.flatten()[t]

    runner = PhasedLoRA.__new__(PhasedLoRA)
    runner.hints = Hints()
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    mask = torch.ones_like(y, dtype=torch.bool)
    target = torch.arange(14).view(2, 7)
    got = runner._scored_nll(logits, y, target, nll, mask)
    want = F.cross_entropy(tilt_logits(logits, token, boost).flatten(0, 1), y.flatten(), reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[boost.flatten() == 0], nll.flatten()[boost.flatten() == 0])  # no hint: the model's NLL


# --- config ------------------------------------------------------------------------------------------


def test_config_sites_agree_with_the_hook_and_frontier_sets_the_mode():
    assert cfgmod.LORA_SITES == SITES
    with pytest.raises(ConfigError, match="TTT_LORA_SITES"):
        cfgmod.resolve("debug", {"ttt_lora_sites": "q,w"}, env={})
    with pytest.raises(ConfigError, match="TTT_LORA_SHORT_CHUNKS"):
        cfgmod.resolve("debug", {"ttt_lora_short_chunks": "256-8"}, env={})
    assert cfgmod.resolve("seed", {}, env={}).eval.eval_mode == "ttt"  # the seed is untouched
    f = cfgmod.resolve("frontier", {}, env={})
    assert f.eval.eval_mode == "lora_ttt" and f.eval_seq_len == 2560
    assert f.eval.ttt_lora_sites == "k,o,mlp,head" and f.eval.ttt_lora_lr == pytest.approx(0.75e-4)
    assert (f.eval.ttt_phases, f.eval.ttt_phase_prefix_docs, f.eval.ttt_lora_short_chunks) == (1, 2500, "256:8,2000:24")
    assert f.eval.ngram_tilt_enabled and f.eval.asym_logit_rescale
    for name in ("frontier-tiny", "frontier-debug"):
        e = cfgmod.resolve(name, {}, env={}).eval
        assert e.eval_mode == "lora_ttt" and e.ttt_lora_doc_batch <= 16 and e.ttt_phase_prefix_docs <= 64
