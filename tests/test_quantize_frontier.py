"""The frontier quantizer's elements (PRs #1855, #1908, #2135): exactness, error, bytes, self-description."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from pgolf import config as cfgmod
from pgolf.config import QuantConfig
from pgolf.errors import ArtifactError, ConfigError
from pgolf.fileio import atomic_write_bytes
from pgolf.quantize import artifact as A
from pgolf.quantize import awq, lowrank
from pgolf.quantize import dequantize_in_memory, load_artifact, quantize_state_dict
from pgolf.quantize import groups as G
from pgolf.quantize.calibrate import HessianHooks, head_input_module
from pgolf.quantize.compare import ELEMENTS, element_methods, frontier_overrides
from pgolf.quantize.gptq import gptq_quantize, output_error
from pgolf.quantize.quantizer import clip_sigmas
from test_quantize import correlated_layer

FRONTIER = frontier_overrides()


def state_and_hessians(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {
        "blocks.0.attn.c_q.weight": torch.randn(64, 128, generator=g) * 0.05,
        "blocks.1.attn.c_q.weight": torch.randn(64, 128, generator=g) * 0.05,
        "blocks.0.mlp.fc.weight": torch.randn(96, 128, generator=g) * 0.05,
        "blocks.0.attn.gate.weight": torch.randn(8, 12, generator=g),
        "tok_emb.weight": torch.randn(200, 128, generator=g) * 0.02,
        "blocks.0.attn_scale": torch.rand(128, generator=g),
        "step": torch.tensor([3], dtype=torch.int64),
    }
    _, h = correlated_layer(rows=2, cols=128, seed=3)
    hess = {k: h for k in state if k.endswith(("c_q.weight", "fc.weight")) or k.startswith("tok_emb")}
    return state, hess


MATRICES = {"blocks.0.attn.c_q.weight", "blocks.1.attn.c_q.weight", "blocks.0.mlp.fc.weight"}


def frontier_qcfg(**over):
    return QuantConfig(passthrough_max_numel=1024, **frontier_overrides(awq_lite_group_size=32,
                                                                        awq_lite_group_top_k=2, **over))


# ---------------------------------------------------------------------------------------------
# presets and knobs


def test_seed_baseline_and_seed_plus_keep_every_element_off():
    for name in ("seed", "baseline", "seed-plus", "tiny", "debug"):
        q = cfgmod.resolve(name, env={}).quant
        assert not any(el.is_on(q) for el in ELEMENTS), name
        assert (q.embed_gptq, q.awq_lite_enabled, q.compress_groups, q.int8_row_tensors, q.lowrank_rank) == (
            False, False, False, "", 0)


def test_awq_bits_must_exceed_the_matrix_bits():
    with pytest.raises(ConfigError, match="AWQ_LITE_BITS=6 must exceed MATRIX_BITS=6"):
        cfgmod.resolve("seed", {"awq_lite_enabled": "1", "awq_lite_bits": "6"}, env={})


def test_sdclip_sigmas_by_role():
    q = QuantConfig(sdclip_k=12.85, mlp_clip_sigmas=11.5, attn_clip_sigmas=13.0, embed_clip_sigmas=14.0)
    assert [clip_sigmas(n, q) for n in ("blocks.3.mlp.fc.weight", "blocks.0.attn.c_q.weight", "tok_emb.weight",
                                        "bigram.proj.weight")] == [11.5, 13.0, 14.0, 12.85]
    assert clip_sigmas("blocks.3.mlp.fc.weight", QuantConfig(sdclip_k=9.0)) == 9.0  # 0 = SDCLIP_K
    state, hess = state_and_hessians()
    entries, rows, _ = quantize_state_dict(state, frontier_qcfg(awq_lite_enabled=False), MATRICES, hess)
    by = {e.name: e for e in entries}
    w = state["blocks.0.mlp.fc.weight"]
    expect = (11.5 * w.std(dim=1) / 31).half()
    assert torch.equal(by["blocks.0.mlp.fc.weight"].parts["scale"], expect)
    emb = by["tok_emb.weight"]
    assert emb.bits == 7 and torch.equal(emb.parts["scale"], (14.0 * state["tok_emb.weight"].std(dim=1) / 63).half())
    assert {r.name: r.method for r in rows}["tok_emb.weight"] == "gptq"  # EMBED_GPTQ with its Hessian


def test_gates_are_int8_per_row():
    state, hess = state_and_hessians()
    entries, rows, _ = quantize_state_dict(state, frontier_qcfg(), MATRICES, hess)
    e = {e.name: e for e in entries}["blocks.0.attn.gate.weight"]
    w = state["blocks.0.attn.gate.weight"]
    assert e.kind == "quant" and e.bits == 8 and e.parts["q"].dtype == torch.int8
    assert torch.equal(e.parts["scale"], (w.abs().amax(dim=1) / 127).half())
    assert int(e.parts["q"].abs().max()) == 127
    assert {r.name: r.method for r in rows}["blocks.0.attn.gate.weight"] == "int8-row"
    # without the knob the same small tensor is fp16
    entries, _, _ = quantize_state_dict(state, frontier_qcfg(int8_row_tensors=""), MATRICES, hess)
    assert {e.name: e.kind for e in entries}["blocks.0.attn.gate.weight"] == "fp16"


# ---------------------------------------------------------------------------------------------
# LQER


def test_lqer_asymmetric_packing_round_trip_and_ranges(tmp_path):
    g = torch.Generator().manual_seed(1)
    err = torch.randn(96, 128, generator=g) @ torch.randn(128, 128, generator=g) * 1e-3
    parts = lowrank.correction_parts(err, 4, "asym", 64)
    qa, qb = parts["lr_a"], parts["lr_b"]
    assert qa.shape == (96, 4) and qb.shape == (4, 128) and parts["lr_a_scale"].shape == ()
    assert parts["lr_b_scale"].shape == (4 * 128 // 64,) and parts["lr_b_scale"].dtype == torch.float16
    assert int(qa.min()) >= -2 and int(qa.max()) <= 1 and int(qb.min()) >= -8 and int(qb.max()) <= 7
    a, b = lowrank.svd_factors(err, 4)
    assert float(parts["lr_a_scale"]) == pytest.approx(float(a.abs().max()) / 1.5, rel=1e-3)
    # stored bit-packed: INT2 and INT4, every byte counted in the file
    e = A.Entry("w", "quant", (96, 128), "float32", {"q": torch.zeros(96, 128, dtype=torch.int8),
                                                     "scale": torch.ones(96, dtype=torch.float16), **parts}, bits=6)
    body = A.encode_body([e], "int8")
    table = A.decode_body(body)[0][0]
    head = __import__("json").loads(body[4: 4 + struct.unpack_from("<I", body)[0]])
    encs = {p["role"]: (p["enc"], p["nbytes"]) for p in head["tensors"][0]["parts"]}
    assert encs["lr_a"] == ("s2", 96 * 4 * 2 // 8) and encs["lr_b"] == ("s4", 4 * 128 * 4 // 8)
    for role in parts:
        assert torch.equal(table.parts[role], parts[role]), role
    delta = A.lowrank_delta(parts)
    assert float((err - delta).norm()) < float(err.norm())  # the packed correction still corrects


@pytest.mark.parametrize("packing", ["asym", "fp16"])
def test_lqer_error_strictly_below_plain_gptq(packing):
    state, hess = state_and_hessians()
    base = frontier_qcfg(lowrank_rank=0, lowrank_tensors=0, awq_lite_enabled=False)
    with_lr = frontier_qcfg(lowrank_rank=4, lowrank_tensors=2, lowrank_packing=packing, awq_lite_enabled=False)
    r0 = {r.name: r for r in quantize_state_dict(state, base, MATRICES, hess)[1]}
    r1 = {r.name: r for r in quantize_state_dict(state, with_lr, MATRICES, hess)[1]}
    fixed = {n for n in r1 if r1[n].lowrank}
    # the two with the largest ||W - W_hat||_F among the GPTQ tensors (the embedding through GPTQ competes too)
    errs = sorted(MATRICES | {"tok_emb.weight"},
                  key=lambda n: -r0[n].rel_err * float(state[n].norm()))
    assert fixed == set(errs[:2])
    for n in fixed:
        assert r1[n].rel_err < r0[n].rel_err and r1[n].out_err < r0[n].out_err, n
    for n in set(r1) - set(fixed):
        assert r1[n].rel_err == r0[n].rel_err


# ---------------------------------------------------------------------------------------------
# AWQ-lite


def test_awq_picks_the_group_with_the_loudest_inputs():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 256, generator=g)
    h = torch.eye(256)
    h[128:192, 128:192] *= 50.0  # inputs 128..191 are ~7x louder
    assert awq.select_groups({"a": (w, h), "b": (w, torch.eye(256))}, 64, 1) == {"a": [128]}
    top2 = awq.select_groups({"a": (w, h), "b": (w, 2 * h)}, 64, 2)
    assert top2 == {"a": [128], "b": [128]}


def test_awq_group_is_quantized_finer_inside_the_same_gptq_solve(tmp_path):
    w, h = correlated_layer(rows=64, cols=128, seed=5)
    h = h.clone()
    h[:, 64:96] *= 4.0
    h[64:96, :] *= 4.0  # make columns 64..95 salient
    bits, k = 6, 12.85
    from pgolf.quantize import rows as R

    s6, s8 = R.sdclip_scales(w, bits, k), R.sdclip_scales(w, 8, k)
    hi = awq.column_mask(128, [64], 32)
    plain = gptq_quantize(w, h, s6, bits, block_size=32)
    mixed = gptq_quantize(w, h, s6, bits, block_size=32, hi_cols=hi, hi_scale16=s8, hi_bits=8)
    assert int(mixed.q[:, ~hi].abs().max()) <= 31 and int(mixed.q[:, hi].abs().max()) > 31
    w_plain = R.dequant(plain.q, s6)
    w_mixed = R.dequant(mixed.q, s6)
    w_mixed[:, hi] = R.dequant(mixed.q[:, hi], s8)
    assert output_error(w, w_mixed, h) < output_error(w, w_plain, h)
    # in the artifact: the other columns stay int6 (packable), the group is stored apart at int8
    state, hess = state_and_hessians()
    entries, rows, _ = quantize_state_dict(state, frontier_qcfg(lowrank_rank=0), MATRICES, hess)
    awq_entries = [e for e in entries if "hi_q" in e.parts]
    assert sum(e.parts["hi_start"].numel() for e in awq_entries) == 2
    for e in awq_entries:
        assert e.parts["q"].shape[1] + e.parts["hi_q"].shape[1] == e.shape[1]
        assert int(e.parts["q"].abs().max()) <= 31 and e.parts["hi_q"].dtype == torch.int8
    for layout in ("packed", "int8"):
        blob, _ = A.choose(entries, "zlib", layout)
        path = tmp_path / f"{layout}.pgz"
        atomic_write_bytes(path, blob)
        loaded, mem = load_artifact(path), dequantize_in_memory(entries)
        assert all(torch.equal(loaded[k], mem[k]) for k in state)


# ---------------------------------------------------------------------------------------------
# similarity sort and the grouped layout


def test_similarity_order_is_a_greedy_l1_chain_from_row_0():
    q = torch.tensor([[0, 0], [9, 9], [1, 0], [8, 9], [1, 1], [1, 1]], dtype=torch.int8)
    order = G.similarity_order(q)
    # 0 -> [1,0] (d1) -> [1,1] (first of the tied pair, index 4) -> its twin 5 -> [8,9] -> [9,9]
    assert order.tolist() == [0, 2, 4, 5, 3, 1] and order.dtype == np.uint16
    g = torch.Generator().manual_seed(0)
    big = torch.randint(-31, 32, (300, 40), generator=g, dtype=torch.int8)
    order = G.similarity_order(big)
    assert sorted(order.tolist()) == list(range(300)) and order[0] == 0
    stored = G.apply_order(big, order)
    assert torch.equal(G.undo_order(stored, order), big)
    with pytest.raises(ValueError):
        G.undo_order(stored, np.zeros(300, dtype=np.uint16))


def test_roles_group_across_layers():
    assert G.role_and_layer("blocks.10.mlp.fc.weight") == ("mlp.fc.weight", 10)
    assert G.role_and_layer("tok_emb.weight") == ("tok_emb.weight", -1)
    roles = G.parse_roles("tok_emb, attn.c_q,mlp.fc.weight")
    assert [G.role_matches(n, roles) for n in ("tok_emb.weight", "blocks.2.attn.c_q.weight",
                                               "blocks.0.mlp.fc.weight", "blocks.0.attn.c_k.weight")] == [
        True, True, True, False]


def test_grouped_container_round_trip_and_bytes(tmp_path):
    state, hess = state_and_hessians()
    entries, _, _ = quantize_state_dict(state, frontier_qcfg(), MATRICES, hess)
    segments = A.encode_segments(entries, A.GROUPED, {"x": 1}, ("tok_emb", "attn.c_q", "mlp.fc"))
    assert [label for label, _ in segments] == ["rest", "attn.c_q.weight", "mlp.fc.weight", "tok_emb.weight"]
    # the two c_q matrices sit together, column-major, rows in similarity order
    by = {e.name: e for e in entries}
    cq = [by[f"blocks.{i}.attn.c_q.weight"].parts["q"] for i in (0, 1)]
    want = b"".join(G.apply_order(q, G.similarity_order(q)).T.contiguous().numpy().tobytes() for q in cq)
    assert dict(segments)["attn.c_q.weight"] == want
    blob, info = A.choose(entries, "auto", "auto", meta={"x": 1}, groups=True, sort_roles=("tok_emb", "attn.c_q",
                                                                                           "mlp.fc"))
    assert "grouped+per-group" in info["candidates"] and len(info["groups"]) == 4
    streams = [(gi["compressor"], gi["raw_bytes"], A.compress(gi["compressor"], seg))
               for gi, (_, seg) in zip(info["groups"], segments)]
    forced = A.frame_streams(streams)
    assert len(forced) == info["candidates"]["grouped+per-group"]
    assert struct.unpack_from("<H", forced, 4)[0] == 3 and forced[6] == A.STREAMS_ID
    path = tmp_path / "g.pgz"
    atomic_write_bytes(path, forced)
    art = A.read_artifact(path)
    assert art.meta == {"x": 1} and art.compressor.startswith("per-group(")
    mem = dequantize_in_memory(entries)
    loaded = art.state_dict()
    assert all(torch.equal(loaded[k], mem[k]) for k in state)
    assert path.stat().st_size == len(forced) == A.HEADER_BYTES + sum(
        A.STREAM_RECORD.size + len(c) for _, _, c in streams) + 4


def test_grouped_container_refuses_damage(tmp_path):
    state, hess = state_and_hessians()
    entries, _, _ = quantize_state_dict(state, frontier_qcfg(), MATRICES, hess)
    segs = A.encode_segments(entries, A.GROUPED)
    blob = A.frame_streams([("zlib", len(s), A.compress("zlib", s)) for _, s in segs])
    path = tmp_path / "a.pgz"
    for bad, pattern in ((blob[:-5], "truncated|header says"), (blob[:100] + bytes([blob[100] ^ 1]) + blob[101:], "sha256")):
        atomic_write_bytes(path, bad)
        with pytest.raises(ArtifactError, match=pattern):
            load_artifact(path)
    # a valid checksum over a stream table that does not add up
    import hashlib

    comp = bytearray(blob[A.HEADER_BYTES:])
    struct.pack_into("<Q", comp, 4 + 1, 12345)  # first stream's raw length
    prefix = blob[: A.PREFIX.size]
    atomic_write_bytes(path, prefix + hashlib.sha256(prefix + bytes(comp)).digest() + bytes(comp))
    with pytest.raises(ArtifactError, match="do not add up"):
        load_artifact(path)


# ---------------------------------------------------------------------------------------------
# calibration of the head input, compare rows


def test_head_input_hessian_is_the_output_of_final_norm():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.final_norm = torch.nn.LayerNorm(16, elementwise_affine=False)

    m = Tiny()
    assert head_input_module(m) is m.final_norm and head_input_module(torch.nn.Linear(2, 2)) is None
    hooks = HessianHooks({}, {"tok_emb.weight": (m.final_norm, 16)})
    x = torch.randn(3, 5, 16)
    y = m.final_norm(x)
    hooks.remove()
    h = hooks.finish()["tok_emb.weight"]
    flat = y.reshape(-1, 16)
    assert torch.allclose(h, flat.T @ flat / 15, atol=1e-5)


def test_element_rows_toggle_each_element():
    off = element_methods(QuantConfig())
    assert all(k.startswith("+ ") for k in off if k != "all frontier quantizer elements")
    on = element_methods(QuantConfig(**FRONTIER))
    assert all(k.startswith("- ") for k in on if k != "all frontier quantizer elements")
    assert len(off) == len(on) == len(ELEMENTS) + 1


# ---------------------------------------------------------------------------------------------
# full-size bytes from shapes


def test_extrapolation_recovers_its_model():
    from pgolf.quantize.estimate import extrapolate

    fr = [1 / 64, 1 / 32, 1 / 8]
    sizes = [round(1000 + 5e6 * f + 300 * math.log(f)) for f in fr]
    total, fit = extrapolate(fr, sizes)
    assert total == pytest.approx(5_001_000, abs=2) and fit["log_term"] == pytest.approx(300, abs=1)
    total, fit = extrapolate(fr[:2], [1000 + 5e6 * f for f in fr[:2]])
    assert total == pytest.approx(5_001_000) and set(fit) == {"fixed", "per_unit_fraction"}


def test_pr1855_shapes_have_its_parameter_count():
    from pgolf.quantize.estimate import PR1855_PARAMS, pr1855_shapes

    shapes = pr1855_shapes()
    assert sum(math.prod(s) for s in shapes.values()) == PR1855_PARAMS == 35_945_671
    assert shapes["tok_emb.weight"] == (8192, 512) and shapes["blocks.10.mlp.fc.weight"] == (2048, 512)


@pytest.mark.slow
def test_full_size_frontier_artifact_estimate():
    """#1855's shapes through the frontier quantizer and the real compressors (Gaussian stand-in body).

    Measured once (2 shared cores), same body built in full: 16,129,045 B (int8+brotli, 125 s). Estimates:
    15.77 MB from fractions 1/128, 1/64 (this test, ~11 s), 16.48 MB from 1/64, 1/32 (two-point linear
    fits are within ~3%), 16.01 MB from the 3-point fit over 1/64, 1/32, 1/8. #2135's trained artifacts
    hold ~15.92 MB of model bytes: the Gaussian stand-in is close to, and a little above, a trained body."""
    from pgolf.quantize.estimate import estimate_artifact_bytes, pr1855_shapes

    q = QuantConfig(**frontier_overrides(int8_row_tensors="*.gate_w"))
    est = estimate_artifact_bytes(pr1855_shapes(), q, fractions=(1 / 128, 1 / 64))
    assert est["params"] == 35_945_671
    assert 15.0e6 < est["model_bytes"] < 17.5e6, est
    b1, b2 = est["measured_bytes"]
    assert b1 < b2 < 2 * b1  # the fixed part is real: doubling the rows does not double the file


# ---------------------------------------------------------------------------------------------
# lrzip: opt-in, a system binary


def test_lrzip_is_opt_in_and_a_missing_binary_is_one_line(monkeypatch, tmp_path):
    import shutil

    state, hess = state_and_hessians()
    entries, _, _ = quantize_state_dict(state, frontier_qcfg(), MATRICES, hess)
    _, info = A.choose(entries, "auto", "auto", groups=True)
    assert not any("lrzip" in k for k in info["candidates"])
    assert all("lrzip" not in g["candidates"] for g in info["groups"])
    if shutil.which("lrzip"):  # an artifact written with lrzip, read where the binary is missing
        blob, _ = A.choose(entries, "lrzip", "int8")
        atomic_write_bytes(tmp_path / "a.pgz", blob)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ArtifactError, match=r"lrzip binary is not on PATH; install the lrzip binary \(apt-get install lrzip\)"):
        A.choose(entries, "auto+lrzip", "auto")
    if (tmp_path / "a.pgz").exists():
        with pytest.raises(ArtifactError, match="apt-get install lrzip"):
            load_artifact(tmp_path / "a.pgz")


@pytest.mark.skipif(not __import__("shutil").which("lrzip"), reason="lrzip binary not installed")
def test_lrzip_per_group_round_trip(tmp_path):
    state, hess = state_and_hessians()
    entries, _, _ = quantize_state_dict(state, frontier_qcfg(), MATRICES, hess)
    blob, info = A.choose(entries, "auto+lrzip", "auto", groups=True, sort_roles=("tok_emb",))
    assert any(k.endswith("+lrzip") for k in info["candidates"])
    assert all("lrzip" in g["candidates"] for g in info["groups"])
    atomic_write_bytes(tmp_path / "a.pgz", blob)
    mem = dequantize_in_memory(entries)
    loaded = load_artifact(tmp_path / "a.pgz")
    assert all(torch.equal(loaded[k], mem[k]) for k in state)
    assert A.compress("lrzip", b"pgolf" * 999) == A.compress("lrzip", b"pgolf" * 999)  # deterministic


def test_the_frontier_presets_switch_every_quantizer_element_on():
    from pgolf.config import PRESETS
    from pgolf.quantize.compare import frontier_overrides

    for name in ("frontier", "frontier-tiny", "frontier-debug"):
        q = PRESETS[name]().quant
        assert {k: getattr(q, k) for k in frontier_overrides()} == frontier_overrides(), name
