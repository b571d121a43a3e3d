"""pgolf.model.gpt on CPU: parameter counts, presets, every architecture switch, losses, groups, init."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch

from model_fixtures import SMALL, perturbed, tokens
from pgolf.model.compiled import Compiled
from pgolf.config import PRESETS, ModelConfig
from pgolf.errors import ConfigError
from pgolf.model import GPT, build_model

CONTROL = re.compile(r"norm|scale|gain|mix|skip|lambda|gate|smear")


def meta_model(preset: str) -> GPT:
    with torch.device("meta"):
        return GPT(PRESETS[preset]().model)


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
