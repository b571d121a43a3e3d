"""pgolf.model on CPU: parameter counts, every architecture switch, the BOS mask, QAT, losses, groups."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from pgolf.compiled import Compiled
from pgolf.config import PRESETS, ModelConfig
from pgolf.errors import ConfigError
from pgolf.model import (
    BOS_ID, GPT, CastedLinear, attention_backend_in_use, bigram_hash, build_model, fake_quant_rows,
)

CONTROL = re.compile(r"norm|scale|gain|mix|skip|lambda|gate|smear")

# every feature on, at a size that runs in milliseconds: head dim 16, partial RoPE 8 of 16
SMALL = replace(
    PRESETS["debug"]().model,
    vocab_size=64, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
    bigram_buckets=32, bigram_dim=8, xsa_last_n=1, rope_dims=8, ln_scale=True,
    value_residual=True, gated_attention=True, smear_gate=True,
)


def meta_model(preset: str) -> GPT:
    with torch.device("meta"):
        return GPT(PRESETS[preset]().model)


def perturbed(cfg: ModelConfig, seed: int = 0) -> GPT:
    """An fp32 CPU model with noise on every parameter, so zero-init paths (proj, gate W, bigram table) act."""
    torch.manual_seed(seed)
    model = build_model(cfg, "cpu")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def tokens(batch: int = 2, seq: int = 24, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    idx = torch.randint(2, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    idx[:, 0] = BOS_ID
    return idx


# ---- parameter counts ------------------------------------------------------------------------


def test_param_counts_match_the_references():
    assert meta_model("baseline").num_params() == 17_059_912  # the naive baseline's logged count
    assert meta_model("seed").num_params() == 27_137_221  # technique-spec §2.5 (a), matches its log
    assert meta_model("seed-plus").num_params() == 27_137_221  # XSA / partial RoPE / LN scale add none


def spec_formula(c: ModelConfig) -> int:
    """technique-spec §2.5 (a), written for any shape."""
    d, L, kv = c.model_dim, c.num_layers, c.num_kv_heads * c.head_dim
    enc = L // 2
    per_layer = 2 * d * d + 2 * d * kv + 2 * d * c.mlp_hidden + c.num_heads + 4 * d
    per_layer += (c.num_heads * d + c.num_heads) if c.gated_attention else 0
    total = c.vocab_size * d + L * per_layer + min(enc, L - enc) * d
    if c.bigram_buckets:
        total += c.bigram_buckets * c.bigram_dim + 1
        total += c.bigram_dim * d if (c.bigram_dim != d or c.bigram_proj == "always") else 0
    total += d if c.smear_gate else 0
    total += 2 * (L - 1) if c.value_residual else 0
    return total


@pytest.mark.parametrize("preset", ["baseline", "seed", "seed-plus", "tiny", "debug"])
def test_param_count_follows_the_spec_formula(preset):
    assert meta_model(preset).num_params() == spec_formula(PRESETS[preset]().model)


# the side-by-side shape of issue 17: d128, 4 layers, 4 heads / 2 KV, seq 256; each source keeps its own
# MLP width and (PR #490) its own BigramHash 4096 x 128, so bigram_dim == model_dim there
SMALL_SHAPE = dict(num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2)


def at_small_shape(preset: str, **extra) -> ModelConfig:
    return replace(PRESETS[preset]().model, **{**SMALL_SHAPE, **extra})


def test_param_counts_at_the_small_shape_match_the_source_scripts():
    with torch.device("meta"):
        assert GPT(at_small_shape("seed")).num_params() == 1_249_703  # PR #490's script at this shape
        assert GPT(at_small_shape("baseline")).num_params() == 592_144  # upstream's baseline at this shape
        assert GPT(at_small_shape("seed-plus")).num_params() == 1_249_703
        # pgolf's old rule kept the 128 x 128 projection: 16,384 parameters the source does not have
        assert GPT(at_small_shape("seed", bigram_proj="always")).num_params() == 1_249_703 + 128 * 128


@pytest.mark.parametrize("bigram_dim, model_dim, rule, present", [
    (128, 512, "if_needed", True), (128, 128, "if_needed", False), (64, 128, "if_needed", True),
    (128, 128, "always", True), (32, 64, "always", True),
])
def test_bigram_projection_exists_exactly_when_the_widths_differ(bigram_dim, model_dim, rule, present):
    cfg = replace(PRESETS["seed"]().model, model_dim=model_dim, num_heads=4, num_kv_heads=2, num_layers=2,
                  bigram_dim=bigram_dim, bigram_proj=rule)
    with torch.device("meta"):
        model = GPT(cfg)
    assert (model.bigram.proj is not None) == present
    assert ("bigram.proj.weight" in dict(model.param_groups()["matrix"])) == present


# ---- presets switch on what they claim -------------------------------------------------------


def test_seed_preset_elements():
    m = meta_model("seed")
    assert len(m.blocks) == 11 and m.num_encoder == 5 and tuple(m.skip_weights.shape) == (5, 512)
    assert m.blocks[0].attn.vr_lambda is None and all(b.attn.vr_lambda is not None for b in m.blocks[1:])
    assert all(tuple(b.attn.gate.weight.shape) == (8, 512) for b in m.blocks)
    assert tuple(m.bigram.table.weight.shape) == (4096, 128) and tuple(m.bigram.proj.weight.shape) == (512, 128)
    assert tuple(m.smear.gate.shape) == (512,)
    assert not m.smear.bos_mask and not m.bigram.bos_mask  # PR #490 has no BOS mask
    assert not any(b.attn.xsa for b in m.blocks) and all(b.branch_scale == 1.0 for b in m.blocks)
    assert m.rotary.dims == 64 and m.rotary.ntk_ref_len == 1024
    assert m.blocks[0].mlp.slope == 0.5 and tuple(m.blocks[0].mlp.fc.weight.shape) == (1536, 512)
    assert tuple(m.blocks[0].attn.c_k.weight.shape) == (256, 512) and m.lm_head is None


def test_seed_plus_adds_xsa_partial_rope_ln_scale():
    m = meta_model("seed-plus")
    assert [b.attn.xsa for b in m.blocks] == [False] * 7 + [True] * 4
    assert m.rotary.dims == 16 and m.rotary.ntk_ref_len == 0
    assert [b.branch_scale for b in m.blocks] == pytest.approx([1 / math.sqrt(l + 1) for l in range(11)])
    assert m.smear.bos_mask and m.bigram.bos_mask and m.cfg.orthogonal_min_dim == 0  # pgolf's fixes
    tiny = meta_model("tiny")  # tiny is a small seed-plus: every element stays on
    assert tiny.bigram is not None and tiny.smear is not None and tiny.rotary.dims == 16
    assert tiny.smear.bos_mask and tiny.cfg.orthogonal_min_dim == 0
    assert tiny.blocks[-1].attn.xsa and tiny.blocks[1].attn.vr_lambda is not None


def test_baseline_preset_elements():
    m = meta_model("baseline")
    assert len(m.blocks) == 9 and tuple(m.skip_weights.shape) == (4, 512)
    assert m.bigram is None and m.smear is None
    assert all(b.attn.gate is None and b.attn.vr_lambda is None for b in m.blocks)
    assert m.blocks[0].mlp.slope == 0.0 and tuple(m.blocks[0].mlp.fc.weight.shape) == (1024, 512)
    assert m.cfg.weight_init == "default" and m.cfg.attention_backend == "sdpa"  # as upstream's script


# ---- every switch changes the output, and "off" means the formula's neutral value ------------

TOGGLES = {
    "value_residual": dict(value_residual=False),
    "gated_attention": dict(gated_attention=False),
    "xsa": dict(xsa_last_n=0),
    "bigram": dict(bigram_buckets=0),
    "smear": dict(smear_gate=False),
    "partial_rope": dict(rope_dims=0),
    "ln_scale": dict(ln_scale=False),
    "unet_skips": dict(unet_skips=False),
    "leaky_relu": dict(mlp_activation="relu2"),
    "bos_mask": dict(bos_mask=False),
}


@pytest.mark.parametrize("feature", TOGGLES)
def test_each_element_changes_the_output(feature):
    on = perturbed(SMALL)
    off = GPT(replace(SMALL, **TOGGLES[feature]))
    result = off.load_state_dict(on.state_dict(), strict=False)
    assert not result.missing_keys  # same weights except the feature's own parameters
    idx = tokens()
    with torch.no_grad():
        diff = (on(idx) - off(idx)).abs().max().item()
    assert diff > 1e-4, f"{feature} has no effect"


def test_neutral_settings_reduce_to_the_feature_off():
    """Setting a feature's parameters to their neutral values reproduces the model without it."""
    on = perturbed(SMALL)
    with torch.no_grad():
        for block in on.blocks:
            if block.attn.vr_lambda is not None:
                block.attn.vr_lambda.copy_(torch.tensor([0.0, 1.0]))  # v <- 0*v0 + 1*v
            block.attn.gate.weight.zero_()
            block.attn.gate.bias.fill_(60.0)  # sigmoid = 1 in fp32
        on.bigram.scale.zero_()
        on.smear.gate.fill_(-200.0)  # sigmoid = 0
    off = GPT(replace(SMALL, value_residual=False, gated_attention=False, bigram_buckets=0, smear_gate=False))
    off.load_state_dict(on.state_dict(), strict=False)
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(on(idx), off(idx), rtol=0, atol=1e-5)


def test_xsa_removes_the_own_value_direction():
    """At an XSA layer each head's output is orthogonal to its position's raw (pre-VR) value vector."""
    model = perturbed(SMALL)  # 3 layers, XSA on the last one
    seen: dict[tuple[int, str], torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        block.attn.c_v.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__((i, "v"), out))
        block.attn.proj.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__((i, "y"), inp[0]))
    with torch.no_grad():
        model(tokens())

    def overlap(layer: int) -> float:
        v = F.normalize(seen[layer, "v"].view(2, 24, 1, 16), dim=-1)  # 1 KV head for both query heads
        y = seen[layer, "y"].view(2, 24, 2, 16)
        assert y.abs().max() > 1e-2
        return (y * v).sum(-1).abs().max().item()

    assert overlap(2) < 1e-5
    assert overlap(1) > 1e-3  # a layer without XSA has no such constraint


def test_output_is_causal():
    """Changing token j never changes the logits at positions < j (bigram and smear look back only)."""
    model = perturbed(SMALL)
    idx = tokens(seq=20)
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 7) % 60 + 2
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4


def test_logits_are_softcapped_fp32():
    model = perturbed(replace(SMALL, logit_softcap=2.0))
    with torch.no_grad():
        logits = model(tokens())
    assert logits.dtype == torch.float32 and logits.shape == (2, 24, 64)
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.0


# ---- the BOS mask (technique-spec §7.1 item 8) ------------------------------------------------


def test_bigram_hash_values():
    idx = torch.tensor([[5, 7, BOS_ID, 9, 7]])
    expected = [15, (36313 * 7 ^ 27191 * 5) % 15, 15, (36313 * 9 ^ 27191 * BOS_ID) % 15, (36313 * 7 ^ 27191 * 9) % 15]
    assert bigram_hash(idx, 16, bos_mask=True).tolist() == [expected]
    expected[2] = (36313 * BOS_ID ^ 27191 * 7) % 15  # PR #490: a BOS is hashed with the token before it
    assert bigram_hash(idx, 16, bos_mask=False).tolist() == [expected]


def two_docs(prev_token: int) -> torch.Tensor:
    """Doc k = [BOS, 5, 9, 13, prev_token], doc k+1 = [BOS, 6, 11, ...] in one row."""
    return torch.tensor([[BOS_ID, 5, 9, 13, prev_token, BOS_ID, 6, 11, 20, 30]])


def test_x0_at_bos_ignores_the_previous_document():
    model = perturbed(SMALL)
    with torch.no_grad():
        a, b = model.embed(two_docs(40)), model.embed(two_docs(41))
    torch.testing.assert_close(a[:, 5], b[:, 5], rtol=0, atol=0)  # the BOS of doc k+1
    assert (a[:, 4] - b[:, 4]).abs().max() > 1e-3  # the changed token itself
    # control: the same change one position later (a non-BOS position) does reach x0
    c, d = model.embed(two_docs(40)[:, [0, 1, 2, 3, 4, 6]]), model.embed(two_docs(41)[:, [0, 1, 2, 3, 4, 6]])
    assert (c[:, 5] - d[:, 5]).abs().max() > 1e-3


@pytest.mark.parametrize("path", ["smear", "bigram"])
def test_each_input_path_alone_respects_bos(path):
    off = dict(smear=dict(bigram_buckets=0), bigram=dict(smear_gate=False))[path]
    model = perturbed(replace(SMALL, **off))
    with torch.no_grad():
        a, b = model.embed(two_docs(40)), model.embed(two_docs(41))
    torch.testing.assert_close(a[:, 5], b[:, 5], rtol=0, atol=0)
    assert (a[:, 6] - b[:, 6]).abs().max() == 0  # pos 6 reads BOS and token 6 only, both unchanged


def test_without_the_mask_x0_is_pr490s_formula_and_leaks_across_bos():
    model = perturbed(replace(SMALL, bos_mask=False))
    idx = two_docs(40)
    with torch.no_grad():
        e = model.tok_emb(idx) + model.bigram(idx)
        x = F.rms_norm(e, (e.size(-1),))
        g = torch.sigmoid(model.smear.gate)
        prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)  # x_{-1} = 0
        torch.testing.assert_close(model.embed(idx), (1 - g) * x + g * prev, rtol=0, atol=0)
        a, b = model.embed(two_docs(40)), model.embed(two_docs(41))
    assert (a[:, 5] - b[:, 5]).abs().max() > 1e-3  # the BOS of doc k+1 sees doc k's last token


def test_full_forward_at_bos_ignores_the_previous_document_without_attention():
    """With attention outputs zeroed, position i sees only x0_i: BOS logits must not move."""
    model = perturbed(SMALL)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.zero_()
        a, b = model(two_docs(40)), model(two_docs(41))
    torch.testing.assert_close(a[:, 5], b[:, 5], rtol=0, atol=0)
    assert (a[:, 4] - b[:, 4]).abs().max() > 1e-3


# ---- QAT -------------------------------------------------------------------------------------


def test_fake_quant_rows_int6():
    w = torch.tensor([[3.1, -1.0, 0.04, 0.0], [0.0, 0.0, 0.0, 0.0], [-0.62, 0.31, 0.16, 0.0]])
    expected = torch.tensor([[3.1, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-0.62, 0.32, 0.16, 0.0]])
    torch.testing.assert_close(fake_quant_rows(w, 6), expected, rtol=0, atol=1e-6)
    q = fake_quant_rows(torch.randn(16, 64), 6)
    scale = q.abs().amax(1, keepdim=True) / 31
    steps = q / scale
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)  # on the int6 grid
    assert steps.abs().max() <= 31 + 1e-4


def test_qat_changes_forward_and_uses_straight_through_gradients():
    model = perturbed(SMALL)
    idx, tgt = tokens(), tokens(seed=1)
    with torch.no_grad():
        plain = model(idx)
        model.set_qat(True)
        assert model.qat_enabled
        quant = model(idx)
        model.set_qat(False)
        again = model(idx)
    assert (plain - quant).abs().max() > 1e-4
    torch.testing.assert_close(plain, again, rtol=0, atol=0)
    assert not any("qat" in k for k in model.state_dict())  # the flag is not saved

    # STE: grads with QAT on equal the grads of a model whose weights ARE the fake-quantized ones
    model.set_qat(True)
    model.loss(idx, tgt).backward()
    ref = GPT(SMALL)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in ref.blocks.modules():
            if isinstance(m, CastedLinear) and m.qat_bits:
                m.weight.copy_(fake_quant_rows(m.weight, 6))
    ref.loss(idx, tgt).backward()
    w, w_ref = model.blocks[1].mlp.fc.weight, ref.blocks[1].mlp.fc.weight
    assert w.grad.abs().max() > 0
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-6)
    # only block matrices are quantized: not the gate, not the bigram projection
    assert model.blocks[0].attn.gate.qat_bits == 0 and model.bigram.proj.qat_bits == 0


def _compiled_qat_roundtrip(backend: str):
    model = perturbed(replace(SMALL, num_layers=2))
    compiled = Compiled("qat_roundtrip", model, planned=2, state=lambda: {"qat": model.qat_enabled}, backend=backend)
    idx = tokens()
    with torch.no_grad():
        plain = compiled(idx)
        assert compiled.graphs == 1  # QAT off: the fake-quant is not traced at all
        model.set_qat(True)
        quant = compiled(idx)
        eager_quant = model(idx)
        model.set_qat(False)
        again = compiled(idx)
        model.set_qat(True)
        compiled(idx)
    # QAT on is the second graph; flipping back and forth reuses both (never frozen at trace time)
    assert compiled.graphs == 2 and [e.reason for e in compiled.events][1] == "qat False -> True"
    assert (plain - quant).abs().max() > 1e-4  # the flag took effect inside the compiled graph
    torch.testing.assert_close(quant, eager_quant, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, again, rtol=0, atol=0)


def test_qat_flag_takes_effect_under_torch_compile():
    _compiled_qat_roundtrip("aot_eager")  # dynamo tracing + functionalized graph, seconds on CPU


@pytest.mark.slow
def test_qat_flag_takes_effect_under_inductor():
    """The same on inductor, for one CastedLinear (the whole model costs ~40 s CPU of C++ compiles)."""
    torch.manual_seed(0)
    model = GPT(replace(SMALL, num_layers=1))
    linear = model.blocks[0].mlp.fc
    compiled = Compiled("qat_linear", linear, planned=2)
    x = torch.randn(4, 32)
    with torch.no_grad():
        plain = compiled(x)
        model.set_qat(True)
        quant = compiled(x)
        model.set_qat(False)
        again = compiled(x)
    assert compiled.graphs == 2
    torch.testing.assert_close(quant, F.linear(x, fake_quant_rows(linear.weight, 6)), rtol=1e-5, atol=1e-6)
    assert (plain - quant).abs().max() > 1e-4
    torch.testing.assert_close(plain, again, rtol=0, atol=0)


# ---- losses ----------------------------------------------------------------------------------


def test_loss_and_per_token_nll_agree():
    model = perturbed(SMALL)
    idx, tgt = tokens(), tokens(seed=1)
    with torch.no_grad():
        nll = model.per_token_nll(idx, tgt)
        loss = model.loss(idx, tgt)
        logits = model(idx)
    assert nll.shape == (2, 24) and nll.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(nll.mean(), loss)
    manual = -torch.log_softmax(logits.double(), -1).gather(-1, tgt[..., None]).squeeze(-1)
    torch.testing.assert_close(nll.double(), manual, rtol=1e-5, atol=1e-5)


def test_a_few_steps_learn_a_batch():
    model = build_model(SMALL, "cpu")
    idx = tokens(batch=4, seq=32)
    adam = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model.loss(idx[:, :-1], idx[:, 1:])
    assert abs(first.item() - math.log(64)) < 0.1  # tied embedding at std 0.005: near uniform
    first.backward()
    assert model.bigram.table.weight.grad.abs().max() > 0  # the bigram path learns from step 1
    for _ in range(40):
        adam.step()
        adam.zero_grad()
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
    assert loss.item() < first.item() - 1.0


# ---- groups, init, dtypes, backends -----------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_param_groups_partition_every_parameter(tie):
    model = GPT(replace(SMALL, tie_embeddings=tie))
    groups = model.param_groups()
    names = [n for group in groups.values() for n, _ in group]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(set(names)) == len(names)
    matrix = dict(groups["matrix"])
    assert "bigram.proj.weight" in matrix and "blocks.0.attn.gate.weight" in matrix
    assert all(p.ndim == 2 for p in matrix.values())
    assert all(not CONTROL.search(n) for n in matrix if not n.endswith("attn.gate.weight"))
    assert [n for n, _ in groups["embed"]] == ["tok_emb.weight", "bigram.table.weight"]
    assert all(CONTROL.search(n) for n, _ in groups["scalar"])
    assert {"skip_weights", "smear.gate", "bigram.scale", "blocks.1.attn.vr_lambda",
            "blocks.0.resid_mix", "blocks.0.attn.q_gain", "blocks.0.attn.gate.bias"} <= {n for n, _ in groups["scalar"]}
    assert [n for n, _ in groups["head"]] == ([] if tie else ["lm_head.weight"])


def test_init_follows_the_spec():
    torch.manual_seed(0)
    cfg = replace(PRESETS["tiny"]().model, num_layers=2)
    model = build_model(cfg, "cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert abs(model.tok_emb.weight.std().item() - 0.005) < 5e-4
    b = model.blocks[1]
    for lin in (b.attn.proj, b.mlp.proj, b.attn.gate):
        assert lin.weight.abs().max() == 0
    assert torch.all(b.attn.gate.bias == 4.0) and torch.all(b.attn.q_gain == 1.5)
    assert b.attn.vr_lambda.tolist() == [0.5, 0.5] and b.resid_mix[0].eq(1).all() and b.resid_mix[1].eq(0).all()
    wq = b.attn.c_q.weight
    torch.testing.assert_close(wq @ wq.T, torch.eye(wq.size(0)), rtol=0, atol=1e-4)  # orthogonal
    proj = model.bigram.proj.weight  # (128, 64): orthonormal columns, scaled by 1/sqrt(2L)
    torch.testing.assert_close(proj.T @ proj, torch.eye(64) / (2 * 2), rtol=0, atol=1e-4)
    assert model.bigram.table.weight.abs().max() == 0 and model.bigram.scale.item() == pytest.approx(0.05)


def test_pr490_init_leaves_narrow_linears_as_drawn():
    """PR #490 re-draws a linear orthogonal only when both dims are >= 64: below, c_k/c_v keep
    nn.Linear's Kaiming-uniform draw and the bigram projection stays at its constructor's zeros."""
    torch.manual_seed(0)
    narrow = replace(PRESETS["seed"]().model, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1,
                     bigram_buckets=64, bigram_dim=32)  # head dim 32: c_k is 32 x 64
    model = build_model(narrow, "cpu")
    wq, wk = model.blocks[0].attn.c_q.weight, model.blocks[0].attn.c_k.weight
    torch.testing.assert_close(wq @ wq.T, torch.eye(64), rtol=0, atol=1e-4)
    assert (wk @ wk.T - torch.eye(32)).abs().max() > 0.5 and wk.abs().max() <= 1 / math.sqrt(64)
    assert model.bigram.proj.weight.abs().max() == 0  # and so the bigram path never trains
    fixed = build_model(replace(narrow, orthogonal_min_dim=0), "cpu")  # seed-plus's rule: every width
    assert fixed.bigram.proj.weight.abs().max() > 0


def source_weights(c: ModelConfig, seed: int, orthogonal: bool) -> dict[str, torch.Tensor]:
    """The weights both source scripts draw for `seed`, from torch.nn alone (tied embedding, no untied head).

    Their constructors draw in this order: tok_emb; BigramHash table, then its projection only when
    bigram_dim != model_dim (zeroed); per block c_q, c_k, c_v, proj (zeroed), the gate (weight zeroed,
    bias 4), MLP fc, proj (zeroed). Then the embedding is re-drawn N(0, 0.005²) and, in PR #490, every
    linear not zeroed on purpose whose both dims are >= 64 is re-drawn orthogonal in module order (the
    bigram projection then scaled by 1/√(2L)).
    """
    torch.manual_seed(seed)
    d, hd, L = c.model_dim, c.head_dim, c.num_layers
    w = {"tok_emb.weight": torch.nn.Embedding(c.vocab_size, d).weight.detach()}
    linears = []  # (name, weight, zeroed on purpose)
    if c.bigram_buckets:
        w["bigram.table.weight"] = torch.nn.Embedding(c.bigram_buckets, c.bigram_dim).weight.detach().zero_()
        if c.bigram_dim != d:
            linears.append(("bigram.proj", torch.nn.Linear(c.bigram_dim, d, bias=False).weight.detach().zero_(), False))
    for i in range(L):
        p = f"blocks.{i}."
        for name, n_in, n_out in (("attn.c_q", d, c.num_heads * hd), ("attn.c_k", d, c.num_kv_heads * hd),
                                  ("attn.c_v", d, c.num_kv_heads * hd), ("attn.proj", d, d)):
            linears.append((p + name, torch.nn.Linear(n_in, n_out, bias=False).weight.detach(), name == "attn.proj"))
        if c.gated_attention:
            gate = torch.nn.Linear(d, c.num_heads)
            w[p + "attn.gate.bias"] = gate.bias.detach().fill_(4.0)
            linears.append((p + "attn.gate", gate.weight.detach(), True))
        linears.append((p + "mlp.fc", torch.nn.Linear(d, c.mlp_hidden, bias=False).weight.detach(), False))
        linears.append((p + "mlp.proj", torch.nn.Linear(c.mlp_hidden, d, bias=False).weight.detach(), True))
    torch.nn.init.normal_(w["tok_emb.weight"], std=0.005)
    for name, weight, zeroed in linears:
        if zeroed:
            weight.zero_()
        elif orthogonal and min(weight.shape) >= 64:
            torch.nn.init.orthogonal_(weight)
            if name == "bigram.proj":
                weight.mul_(1 / math.sqrt(2 * L))
        w[name + ".weight"] = weight
    return w


@pytest.mark.parametrize("preset, extra", [
    ("baseline", {}),  # upstream: nn.Linear's default init everywhere but the zeroed projections
    ("seed", {}),  # PR #490 at d128 with its own 4096 x 128 table: no projection
    ("seed", dict(bigram_dim=64)),  # a projection, orthogonal / sqrt(2L)
    ("seed", dict(model_dim=64, num_heads=2, num_kv_heads=1, bigram_dim=32)),  # narrow: the 64 rule bites
])
def test_weights_and_step0_loss_equal_the_sources_for_one_seed(preset, extra):
    cfg = at_small_shape(preset, **extra)
    torch.manual_seed(1337)
    model = build_model(cfg, "cpu")
    ref = source_weights(cfg, 1337, orthogonal=cfg.weight_init == "orthogonal")
    ours = model.state_dict()
    drawn = {k for k in ours if k.endswith(".weight") and ours[k].ndim == 2} | {k for k in ours if k.endswith("gate.bias")}
    assert drawn == set(ref)  # every drawn tensor is accounted for, nothing extra (e.g. no bigram.proj)
    for name, tensor in ref.items():
        assert torch.equal(ours[name], tensor), name
    reference = GPT(cfg)
    reference.load_state_dict({**ours, **ref})
    idx = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert model.loss(idx[:, :-1], idx[:, 1:]).item() == reference.loss(idx[:, :-1], idx[:, 1:]).item()


def test_rotary_ntk_base():
    seed = GPT(replace(SMALL, rope_dims=0, rope_ntk_ref_len=16))
    d = SMALL.head_dim
    for T, base in ((16, 1e4), (32, 1e4 * 2 ** (d / (d - 2)))):
        cos, _ = seed.rotary(T, torch.device("cpu"))
        inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        torch.testing.assert_close(cos[1].double(), torch.cos(inv_freq), rtol=0, atol=1e-6)


def test_sdpa_matches_explicit_gqa_attention():
    from pgolf.attention import causal_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 7, 4, 8, generator=gen), torch.randn(2, 7, 2, 8, generator=gen), torch.randn(2, 7, 2, 8, generator=gen)
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, kk) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), vv)
    torch.testing.assert_close(causal_attention(q, k, v, "sdpa"), ref, rtol=1e-5, atol=1e-5)


def test_attention_backend_selection_on_cpu():
    assert attention_backend_in_use(SMALL, "cpu") == "sdpa"
    assert attention_backend_in_use("sdpa", "cpu") == "sdpa"
    with pytest.raises(ConfigError, match="ATTENTION_BACKEND=fa3"):
        attention_backend_in_use("fa3", "cpu")
    with pytest.raises(ConfigError):
        build_model(replace(SMALL, attention_backend="fa3"), "cpu")


def test_bad_qat_bits_is_one_line_config_error():
    with pytest.raises(ConfigError, match="QAT_BITS=9"):
        GPT(replace(SMALL, qat_bits=9))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_build_dtypes_and_compiled_forward():
    cfg = replace(PRESETS["tiny"]().model, num_layers=2)
    model = build_model(cfg, "cuda")
    assert model.tok_emb.weight.dtype == torch.bfloat16 and model.bigram.table.weight.dtype == torch.bfloat16
    assert model.blocks[0].attn.c_q.weight.dtype == torch.float32 and model.smear.gate.dtype == torch.float32
    compiled = Compiled("train_step", model, planned=2, state=lambda: {"qat": model.qat_enabled})
    idx = torch.randint(0, cfg.vocab_size, (2, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(idx[:, :-1], idx[:, 1:])
        loss.backward()
        model.set_qat(True)
        quant = compiled(idx[:, :-1], idx[:, 1:])
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and quant.item() != loss.item()
