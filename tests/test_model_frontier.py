"""PR #1855's model elements (technique-spec column (b)): counts, schedule, equations, causality, off = identical."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from model_fixtures import SMALL, perturbed, tokens
from pgolf.config import PRESETS, ModelConfig
from pgolf.errors import ConfigError
from pgolf.model import BOS_ID, GPT, build_model
from pgolf.model.attention import causal_attention, cu_seqlens_from_tokens, doc_mask
from pgolf.model.gpt import block_schedule
from pgolf.model.layers import rms_norm

# every #1855 element on, at test size: 4 layers, span 1..2 looped 3x -> [0,1,2,1 | 2,1,2,3], lanes on layer 3
FRONTIER_SMALL = replace(
    SMALL, num_layers=4, value_residual=False, gated_attention=False, bigram_buckets=0, smear_gate=False,
    xsa_last_n=4, num_loops=2, loop_start=1, loop_end=2, parallel_lanes=True, parallel_start_layer=3,
    skip_gates=True, sparse_attn_gate=True, bos_smear_gate=True, gate_window=4, doc_isolation=True,
)


def frontier_model(cfg: ModelConfig = FRONTIER_SMALL, seed: int = 0) -> GPT:
    return perturbed(cfg, seed)


def docs_tokens(seed: int = 0) -> torch.Tensor:
    idx = tokens(batch=2, seq=24, seed=seed)
    idx[0, 9] = BOS_ID  # row 0: documents [0, 9) and [9, 24); row 1 has one
    idx[1, 17] = BOS_ID
    return idx


def meta(preset: str) -> GPT:
    with torch.device("meta"):
        return GPT(PRESETS[preset]().model)


# ---- parameter counts (spec §2.5 (b)) ----------------------------------------------------------


def spec_formula_b(c: ModelConfig) -> int:
    """V·d + L·[2d² + 2·d·kv + 2·d·hidden] + L·(H + 4d + H·w) + 2·skips·d + 6L + w + 1, any shape."""
    d, L, kv, w = c.model_dim, c.num_layers, c.num_kv_heads * c.head_dim, c.gate_window
    slots = len(block_schedule(c, looping=True))
    skips = min(slots // 2, slots - slots // 2)
    return (c.vocab_size * d + L * (2 * d * d + 2 * d * kv + 2 * d * c.mlp_hidden)
            + L * (c.num_heads + 4 * d + c.num_heads * w) + 2 * skips * d + 6 * L + w + 1)


def test_full_size_frontier_has_pr1855s_parameter_count_and_shapes():
    from pgolf.quantize.estimate import PR1855_PARAMS, pr1855_shapes

    m = meta("frontier")
    assert m.num_params() == PR1855_PARAMS == 35_945_671 == spec_formula_b(m.cfg)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == pr1855_shapes()


@pytest.mark.parametrize("preset, count", [("frontier-tiny", 855_285), ("frontier-debug", 201_837)])
def test_small_frontier_counts_follow_the_formula(preset, count):
    assert meta(preset).num_params() == spec_formula_b(PRESETS[preset]().model) == count


# ---- the schedule (spec §2.3 (b) step 2) ---------------------------------------------------------


def test_schedule_of_pr1855_and_the_small_presets():
    m = meta("frontier")
    assert m.looping and m.num_slots == 17 and m.num_encoder == 8 and tuple(m.skip_weights.shape) == (8, 512)
    assert m.schedule[:8] == [0, 1, 2, 3, 4, 5, 3, 4] and m.schedule[8:] == [5, 3, 4, 5, 6, 7, 8, 9, 10]
    m.set_looping(False)
    assert m.num_slots == 11 and m.schedule == list(range(11))
    assert block_schedule(PRESETS["frontier-tiny"]().model, True) == [0, 1, 2, 1, 2, 1, 2, 3]
    assert block_schedule(PRESETS["frontier-debug"]().model, True) == [0, 1, 1, 1, 2]
    seed = meta("seed")
    assert not seed.looping and seed.num_slots == 11
    seed.set_looping(True)  # no recurrence configured: the switch does nothing
    assert not seed.looping and seed.num_slots == 11


def test_lanes_in_the_encoder_or_inside_the_loop_are_refused():
    with pytest.raises(ConfigError, match="PARALLEL_START_LAYER"):
        GPT(replace(FRONTIER_SMALL, num_loops=0, parallel_start_layer=1))  # slot 1 is an encoder slot
    with pytest.raises(ConfigError, match="after the looped span"):
        PRESETS["frontier"]().with_overrides(parallel_start_layer=5)
    with pytest.raises(ConfigError, match="LOOP_START"):
        PRESETS["frontier"]().with_overrides(loop_end=11)


# ---- the whole stack against a hand-written spec forward ----------------------------------------


def reference_forward(m: GPT, idx: torch.Tensor, order: list[int], lane_start: int) -> torch.Tensor:
    """Spec §2.3 (b) steps 1-5 written out, using only each block's attention and MLP modules."""
    B, T = idx.shape
    e = m.tok_emb(idx)
    w, lam, win = m.smear.gate_w, m.smear.lam, m.cfg.gate_window
    x = e.clone()
    for t in range(1, T):  # x_t <- x_t + lam * sigmoid(w . x_t[:12]) * x_{t-1} * 1[tok_t != BOS]
        g = torch.sigmoid(e[:, t, :win] @ w)
        x[:, t] = e[:, t] + lam * g[:, None] * e[:, t - 1] * (idx[:, t] != BOS_ID).float()[:, None]
    x0 = x = rms_norm(x)
    cos, sin = m.rotary(T, idx.device)
    mask = doc_mask(idx)
    enc = len(order) // 2

    def attn(block, u):
        return block.attn(u, cos, sin, None, "sdpa", None, 0, mask)[0]

    skips, lanes = [], None
    for slot, i in enumerate(order):
        b = m.blocks[i]
        s = 1 / math.sqrt(i + 1)  # LN scale by the PHYSICAL index
        if slot >= enc and skips:
            j = slot - enc
            skip = m.skip_weights[j] * skips.pop()
            into = x if lanes is None else lanes[0]
            into = skip + torch.sigmoid(m.skip_gates[j]) * (into - skip)
            if lanes is None:
                x = into
            else:
                lanes = (into, lanes[1])
        if slot >= enc and i >= lane_start:
            l0, l1 = (x, x) if lanes is None else lanes
            a = b.attn_scale * attn(b, rms_norm(b.resid_mix[0] * l0 + b.resid_mix[1] * x0) * s)
            mm = b.mlp_scale * b.mlp(rms_norm(l1) * s)
            r, p = m.lane_resid_lambda[i], m.lane_post_lambda[i]
            lanes = (r[0] * l0 + p[0, 0] * a + p[0, 1] * mm, r[1] * l1 + p[1, 0] * a + p[1, 1] * mm)
            continue
        h = b.resid_mix[0] * x + b.resid_mix[1] * x0
        h = h + b.attn_scale * attn(b, rms_norm(h) * s)
        x = h + b.mlp_scale * b.mlp(rms_norm(h) * s)
        if slot < enc:
            skips.append(x)
    x = (lanes[0] + lanes[1]) / 2
    z = rms_norm(x) @ m.tok_emb.weight.T
    return m.cfg.logit_softcap * torch.tanh(z / m.cfg.logit_softcap)


@pytest.mark.parametrize("looping", [True, False])
def test_forward_equals_the_spec_written_out(looping):
    m = frontier_model()
    m.set_looping(looping)
    order = [0, 1, 2, 1, 2, 1, 2, 3] if looping else [0, 1, 2, 3]
    idx = docs_tokens()
    with torch.no_grad():
        torch.testing.assert_close(m(idx), reference_forward(m, idx, order, lane_start=3), rtol=0, atol=2e-5)


def test_looping_off_is_the_model_without_recurrence():
    """The unlooped pass of a recurrent model == the NUM_LOOPS=0 model (its first skips, same weights)."""
    m = frontier_model()
    m.set_looping(False)
    plain = GPT(replace(FRONTIER_SMALL, num_loops=0))
    state = m.state_dict()
    n = plain.skip_weights.size(0)
    state["skip_weights"], state["skip_gates"] = state["skip_weights"][:n], state["skip_gates"][:n]
    plain.load_state_dict(state)
    idx = docs_tokens()
    with torch.no_grad():
        assert torch.equal(m(idx), plain(idx))
        m.set_looping(True)
        assert (m(idx) - plain(idx)).abs().max() > 1e-3


# ---- single elements: exact equations --------------------------------------------------------------


def test_parallel_block_equations():
    m = frontier_model()
    b = m.blocks[3]
    B, T, d = 2, 8, FRONTIER_SMALL.model_dim
    gen = torch.Generator().manual_seed(3)
    l0, l1, x0 = (torch.randn(B, T, d, generator=gen) for _ in range(3))
    r, p = torch.tensor([1.1, 0.7]), torch.tensor([[1.0, 0.3], [-0.5, 2.0]])
    cos, sin = m.rotary(T, "cpu")
    s = 1 / math.sqrt(4)
    with torch.no_grad():
        n0, n1 = b.parallel(l0, l1, x0, cos, sin, None, "sdpa", r, p)
        a = b.attn_scale * b.attn(rms_norm(b.resid_mix[0] * l0 + b.resid_mix[1] * x0) * s, cos, sin, None, "sdpa")[0]
        mm = b.mlp_scale * b.mlp(rms_norm(l1) * s)  # the MLP reads lane 1 only, not this block's attention
    torch.testing.assert_close(n0, 1.1 * l0 + a + 0.3 * mm)
    torch.testing.assert_close(n1, 0.7 * l1 - 0.5 * a + 2.0 * mm)


def test_sparse_attn_gate_scales_each_head_by_its_sigmoid():
    cfg = replace(FRONTIER_SMALL, xsa_last_n=0)
    m = frontier_model(cfg)
    attn = m.blocks[0].attn
    H, D, win = cfg.num_heads, cfg.head_dim, cfg.gate_window
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(H * D))  # the output is the gated heads themselves
        u = torch.randn(2, 10, cfg.model_dim, generator=torch.Generator().manual_seed(1))
        cos, sin = m.rotary(10, "cpu")
        gated = attn(u, cos, sin, None, "sdpa")[0].view(2, 10, H, D)
        w = attn.gate_w.clone()
        attn.gate_w = None
        plain = attn(u, cos, sin, None, "sdpa")[0].view(2, 10, H, D)
    gate = torch.sigmoid(0.5 * u[..., :win] @ w.T)  # (B, T, H): sigma(0.5 * w_h . u[:12])
    torch.testing.assert_close(gated, plain * gate[..., None])
    zero = GPT(cfg).blocks[0].attn.gate_w
    assert tuple(zero.shape) == (H, win) and zero.abs().max() == 0  # zero-init: every head x 0.5 at start


def test_bos_smear_gate_hand_computed_and_neutral_at_init():
    m = frontier_model()
    idx = docs_tokens()
    e = m.tok_emb(idx).detach()
    with torch.no_grad():
        out = m.smear(e, idx)
    lam, w = m.smear.lam.item(), m.smear.gate_w.detach()
    for b in range(2):
        for t in range(24):
            want = e[b, t].clone()
            if t > 0 and idx[b, t] != BOS_ID:
                want += lam * torch.sigmoid(e[b, t, :4] @ w) * e[b, t - 1]
            torch.testing.assert_close(out[b, t], want)
    fresh = GPT(FRONTIER_SMALL)
    assert fresh.smear.lam.item() == 0 and fresh.smear.gate_w.abs().max() == 0
    assert torch.equal(fresh.smear(e, idx), e)  # lam = 0: the identity, as with the element off


def test_init_follows_spec_2_4_b():
    torch.manual_seed(0)
    m = build_model(FRONTIER_SMALL, "cpu")
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert m.skip_weights.eq(1).all() and m.skip_gates.eq(0).all()
    assert m.lane_resid_lambda.eq(1.1).all() and m.lane_post_lambda.eq(1).all()
    assert all(b.attn.gate_w.eq(0).all() for b in m.blocks)
    assert m.smear.gate_w.eq(0).all() and m.smear.lam.eq(0).all()
    b = m.blocks[1]
    for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.mlp.fc):  # orthogonal rows (or columns)
        w = lin.weight
        gram = w @ w.T if w.size(0) <= w.size(1) else w.T @ w
        torch.testing.assert_close(gram, torch.eye(gram.size(0)), rtol=0, atol=1e-4)
    assert b.attn.proj.weight.eq(0).all() and b.mlp.proj.weight.eq(0).all()
    assert abs(m.tok_emb.weight.std().item() - 0.005) < 1e-3
    assert PRESETS["frontier"]().model.qk_gain_init == 5.25  # #1953's value (spec (b): 5.0)


def test_new_control_params_go_to_the_scalar_group():
    m = GPT(FRONTIER_SMALL)
    scalar = {n for n, _ in m.param_groups()["scalar"]}
    assert {"skip_gates", "skip_weights", "lane_resid_lambda", "lane_post_lambda", "smear.gate_w", "smear.lam",
            "blocks.0.attn.gate_w", "blocks.3.attn.gate_w"} <= scalar
    assert {n for n, _ in m.param_groups()["matrix"]} == {n for n, p in m.named_parameters()
                                                         if n.startswith("blocks.") and n.endswith(".weight")}


# ---- causality and document isolation --------------------------------------------------------------


def test_output_is_causal_in_both_looping_states():
    m = frontier_model()
    idx = tokens(seq=20)
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 7) % 60 + 2
    for looping in (False, True):
        m.set_looping(looping)
        with torch.no_grad():
            a, b = m(idx), m(changed)
        assert torch.equal(a[:, :12], b[:, :12]) and (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4


def test_doc_isolation_stops_attention_at_bos():
    """Changing document 1 leaves document 2's logits alone (SmearGate is BOS-masked, attention blocked)."""
    idx = docs_tokens()
    changed = idx.clone()
    changed[0, 3] = (changed[0, 3] + 5) % 60 + 2  # inside row 0's first document
    for isolated in (True, False):
        m = frontier_model(replace(FRONTIER_SMALL, doc_isolation=isolated))
        with torch.no_grad():
            a, b = m(idx), m(changed)
        second_doc_moved = (a[0, 9:] - b[0, 9:]).abs().max().item()
        assert (second_doc_moved == 0) == isolated, (isolated, second_doc_moved)
        assert torch.equal(a[1], b[1])  # another row


def test_doc_mask_and_cu_seqlens_by_hand():
    idx = torch.tensor([[1, 5, 6, 1, 7], [4, 1, 8, 9, 1]])
    mask = doc_mask(idx)[:, 0]
    want0 = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    want1 = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 1]])
    assert torch.equal(mask[0], want0.bool()) and torch.equal(mask[1], want1.bool())
    cu = cu_seqlens_from_tokens(idx, per_row=4)
    # row 0 starts at 0, 3 (padded with its end 5); row 1 at 5+0, 5+1, 5+4 (padded with 10); then the total
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 5, 5, 6, 9, 10, 10]


def varlen_reference(q, k, v, cu_seqlens):
    """What FA3's flash_attn_varlen_func computes: causal attention inside each [cu[i], cu[i+1]) of the
    flattened rows, every segment on its own."""
    B, T, H, D = q.shape
    qf, kf, vf = (t.reshape(B * T, t.size(2), D) for t in (q, k, v))
    out = torch.zeros_like(qf)
    bounds = cu_seqlens.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            seg = [t[lo:hi].transpose(0, 1) for t in (qf, kf, vf)]  # (heads, len, D)
            out[lo:hi] = F.scaled_dot_product_attention(*seg, is_causal=True, enable_gqa=True).transpose(0, 1)
    return out.view(B, T, H, D)


def test_cu_seqlens_attention_equals_the_masked_sdpa():
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(2, 50, (3, 40), generator=gen)
    idx[0, [0, 7, 8, 30]] = BOS_ID  # a one-token document, a BOS at position 0
    idx[2, 39] = BOS_ID  # a document that starts at the last position
    q = torch.randn(3, 40, 4, 8, generator=gen)
    k, v = torch.randn(3, 40, 2, 8, generator=gen), torch.randn(3, 40, 2, 8, generator=gen)
    masked = causal_attention(q, k, v, "sdpa", doc_mask(idx))
    torch.testing.assert_close(varlen_reference(q, k, v, cu_seqlens_from_tokens(idx)), masked)
    plain = causal_attention(q, k, v, "sdpa")
    torch.testing.assert_close(masked[1], plain[1])  # a row without BOS: plain causal attention


# ---- the adapter hook with recurrence --------------------------------------------------------------


def test_adapter_slots_follow_the_looping_state():
    m = frontier_model()
    calls = []

    class Rec:
        def delta(self, slot, site, x):
            calls.append((slot, site))
            return None

    for looping, slots in ((True, 8), (False, 4)):
        m.set_looping(looping)
        calls.clear()
        with torch.no_grad():
            m(docs_tokens(), adapter=Rec())
        assert m.num_slots == slots
        assert sorted({s for s, _ in calls}) == [-1, *range(slots)]
        assert [s for s, site in calls if site == "q"] == list(range(slots))  # run order, lanes included


# ---- compile ----------------------------------------------------------------------------------------


def test_looping_switch_is_two_fullgraph_inductor_graphs():
    from pgolf.model.compiled import Compiled

    cfg = replace(FRONTIER_SMALL, num_layers=4)
    m = frontier_model(cfg)
    f = Compiled("t_frontier", m.per_token_nll, planned=2, state=lambda: {"looping": m.looping})
    idx, tgt = docs_tokens(), docs_tokens(seed=1)
    with torch.no_grad():
        for looping in (False, True):
            m.set_looping(looping)
            torch.testing.assert_close(f(idx, tgt), m.per_token_nll(idx, tgt), rtol=1e-4, atol=1e-4)
    assert f.graphs == 2 and "looping False -> True" in f.events[1].reason


# ---- the whole artifact at full size -----------------------------------------------------------------


@pytest.mark.slow
def test_full_size_frontier_artifact_estimate_from_the_model_shapes():
    """The meta-device `frontier` model's shapes through the frontier quantizer (Gaussian stand-in body)."""
    from pgolf.quantize.estimate import estimate_artifact_bytes

    cfg = PRESETS["frontier"]()
    shapes = {k: tuple(v.shape) for k, v in meta("frontier").state_dict().items()}
    est = estimate_artifact_bytes(shapes, cfg.quant, fractions=(1 / 128, 1 / 64))
    assert est["params"] == 35_945_671
    assert 15.0e6 < est["model_bytes"] < 17.5e6, est


def test_every_build_path_gets_a_looping_model():
    """build_model is what the quantizer's calibration and the evaluator call: a recurrent model comes
    out looping (only the trainer starts it unlooped), so an artifact is scored as it was calibrated."""
    m = build_model(PRESETS["frontier-debug"]().model, "cpu")
    assert m.looping and m.num_slots == 5
    assert not build_model(PRESETS["debug"]().model, "cpu").looping


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fa3_varlen_equals_the_masked_sdpa_on_cuda():
    from pgolf.model.attention import attention_backend_in_use

    if attention_backend_in_use("auto", "cuda") != "fa3":
        pytest.skip("FlashAttention 3 is not installed")
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(2, 50, (4, 256), generator=gen)
    idx[0, [0, 17, 18, 200]] = BOS_ID
    idx[3, 255] = BOS_ID
    idx = idx.cuda()
    q, k, v = (torch.randn(4, 256, h, 64, generator=gen).cuda().bfloat16() for h in (8, 4, 4))
    fa3 = causal_attention(q, k, v, "fa3", cu_seqlens_from_tokens(idx))
    sdpa = causal_attention(q.float(), k.float(), v.float(), "sdpa", doc_mask(idx))
    torch.testing.assert_close(fa3.float(), sdpa, rtol=2e-2, atol=2e-2)
    cfg = PRESETS["frontier-debug"]().model
    m = build_model(cfg, "cuda")
    assert m.tok_emb.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if n != "tok_emb.weight")
