"""calibrate -> quantize -> load_artifact on the real GPT (debug preset) and the offline corpus; the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from pgolf import config as cfgmod
from pgolf.errors import BudgetError
from pgolf.model import GPT, build_model
from pgolf.quantize import calibrate, dequantize_in_memory, load_artifact, quantize
from pgolf.quantize.calibrate import target_linears


@pytest.fixture
def cfg(offline_data):
    # debug matrices are 64x64..64x192: lower the passthrough bound so they take the GPTQ path
    return cfgmod.resolve("debug", {"data_path": str(offline_data),
                                    "tokenizer_path": str(offline_data / "tokenizer.model"),
                                    "passthrough_max_numel": 2048, "compressor": "zlib", "device": "cpu"}, env={})


@pytest.fixture
def run_dir(tmp_path, cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu")
    with torch.no_grad():  # untrained zero-init projections would make every error trivially 0
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.05)
    (tmp_path / "checkpoint").mkdir()
    torch.save(model.state_dict(), tmp_path / "checkpoint" / "model.pt")
    (tmp_path / "config.json").write_text(cfg.to_json())
    return tmp_path


def test_calibrate_hessians_match_the_layer_inputs(cfg, run_dir):
    res = calibrate(cfg, run_dir)
    data = torch.load(run_dir / "checkpoint" / "hessians.pt", weights_only=True)
    hs = data["hessians"]
    model = build_model(cfg.model, "cpu")
    model.load_state_dict(torch.load(run_dir / "checkpoint" / "model.pt", weights_only=True))
    targets = target_linears(model, cfg.quant.passthrough_max_numel)
    assert res.n_hessians == len(hs) == len(targets) > 0
    assert set(hs) == set(targets)
    assert res.tokens == cfg.quant.calib_batches * cfg.train.train_batch_tokens
    assert data["meta"]["source"] == "train"
    # recompute one layer's H by hand from the first calibration batch of the train stream
    from pgolf.data.loader import DistributedTokenLoader

    key = sorted(targets)[0]
    xs = []
    handle = targets[key].register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    loader = DistributedTokenLoader(cfg.data.data_path, 0, 1, cfg.model.vocab_size)
    with torch.no_grad():
        for _ in range(cfg.quant.calib_batches):
            x, _ = loader.next_batch(cfg.train.train_batch_tokens, cfg.train.train_seq_len, 1)
            model.eval()(torch.from_numpy(x))
    handle.remove()
    X = torch.cat(xs).double()
    expected = (X.T @ X / X.shape[0]).float()
    torch.testing.assert_close(hs[key], expected, rtol=1e-4, atol=1e-6)


def test_calibrate_self_generated_text(cfg, run_dir):
    c = cfg.with_overrides(calib_source="self", calib_batches=1, train_seq_len=32, micro_batch_seqs=4)
    res = calibrate(c, run_dir)
    assert res.source == "self" and res.tokens == 4 * 32 and res.n_hessians > 0
    h = torch.load(run_dir / "checkpoint" / "hessians.pt", weights_only=True)["hessians"]
    assert all(torch.isfinite(v).all() and float(v.diagonal().min()) >= 0 for v in h.values())


def test_quantize_run_folder_loads_strict_and_stays_close(cfg, run_dir):
    calibrate(cfg, run_dir)
    res = quantize(cfg, run_dir, code_bytes=1234)
    assert res.artifact_path == run_dir / "artifact.pgz" and res.report_path.is_file()
    assert res.model_bytes == res.artifact_path.stat().st_size
    assert res.total_bytes == res.model_bytes + 1234
    report = json.loads(res.report_path.read_text())
    assert report["code_bytes_source"].startswith("given")
    assert report["fallbacks"] == []
    assert {r["method"] for r in report["tensors"]} >= {"gptq", "embed-percentile", "fp16"}
    sd = load_artifact(res.artifact_path)
    mem = dequantize_in_memory(res.entries)
    assert all(torch.equal(sd[k], mem[k]) for k in sd)
    model = GPT(cfg.model)
    model.load_state_dict(sd, strict=True)
    ref = GPT(cfg.model)
    ref.load_state_dict(torch.load(run_dir / "checkpoint" / "model.pt", weights_only=True))
    x = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref.eval()(x), model.eval()(x)
    assert float((a - b).abs().max()) < 0.1 * float(a.abs().max())


def test_quantize_without_hessians_falls_back_and_says_so(cfg, run_dir):
    res = quantize(cfg, run_dir)
    report = json.loads(res.report_path.read_text())
    assert report["hessians"] is None and report["fallbacks"]
    assert all("no Hessian" in f for f in report["fallbacks"])

def test_a_package_run_counts_the_file_that_would_ship(cfg, run_dir, caplog):
    """Not the package's sources: the train_gpt.py `pgolf submission build` would ship for this config."""
    from pgolf.submission.bundle import minifier_version, shipped_code_bytes

    caplog.set_level("INFO", logger="pgolf.quantize.quantizer")
    report = json.loads(quantize(cfg, run_dir).report_path.read_text())
    form = "compressed" if minifier_version() else "raw"
    assert report["code_bytes"] == shipped_code_bytes(cfg, form)
    assert report["code_bytes_source"].startswith(f"train_gpt.py as `pgolf submission build` would ship it "
                                                  f"for this config ({form} form")
    assert "this run ran the package" in report["code_bytes_source"]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Code size:"))
    assert line == f"Code size: {report['code_bytes']} bytes ({report['code_bytes_source']})"


def test_cap_error_fires_with_the_right_numbers_after_writing(cfg, run_dir):
    c = cfg.with_overrides(size_cap_bytes=20_000, quant_method="rtn")
    with pytest.raises(BudgetError) as info:
        quantize(c, run_dir, code_bytes=5_000)
    report = json.loads((run_dir / "quant_report.json").read_text())
    model_bytes = (run_dir / "artifact.pgz").stat().st_size
    assert report["model_bytes"] == model_bytes and report["total_bytes"] == model_bytes + 5_000
    over = model_bytes + 5_000 - 20_000
    msg = str(info.value)
    assert f"{over:,} over the 20,000 B cap" in msg and f"{model_bytes + 5_000:,} B" in msg
    assert "\n" not in msg and report["headroom_bytes"] == -over
    load_artifact(run_dir / "artifact.pgz")  # nothing lost: the artifact is complete


def test_cli_quantize_run_folder_and_cap_error(run_dir, capsys):
    from pgolf.cli import main

    rc = main(["quantize", str(run_dir), "--method", "rtn", "--bits", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and "tok_emb.weight" in out and "rtn-search" in out and "artifact:" in out
    report = json.loads((run_dir / "quant_report.json").read_text())
    assert report["quant"]["matrix_bits"] == 5 and report["quant"]["compressor"] == "zlib"
    rc = main(["quantize", str(run_dir), "--out", str(run_dir / "x.pgz"), "--size-cap-bytes", "1000"])
    captured = capsys.readouterr()
    assert rc == 2 and "over the 1,000 B cap" in captured.err
    assert (run_dir / "x.pgz").is_file()


def test_cli_bare_checkpoint_needs_a_config(run_dir, capsys):
    from pgolf.cli import main

    rc = main(["quantize", str(run_dir / "checkpoint" / "model.pt"), "--out", str(run_dir / "y.pgz")])
    assert rc == 2 and "--config" in capsys.readouterr().err
    rc = main(["quantize", str(run_dir / "checkpoint" / "model.pt"), "--out", str(run_dir / "y.pgz"),
               "--config", str(run_dir / "config.json"), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["model_bytes"] == (run_dir / "y.pgz").stat().st_size


def test_compare_methods_scores_every_variant(cfg, run_dir):
    from pgolf.quantize.compare import compare_methods, format_compare

    rows = compare_methods(cfg, run_dir, max_val_tokens=2048, code_bytes=0)
    assert [r["method"].split(" ")[0] for r in rows[:4]] == ["fp32", "int8", "rtn", "configured"]
    # then one row per frontier element (each switched on alone), then all of them
    from pgolf.quantize.compare import ALL_ELEMENTS, ELEMENTS

    assert [r["method"] for r in rows[4:]] == [f"+ {el.label}" for el in ELEMENTS] + [ALL_ELEMENTS]
    assert all(r["model_bytes"] == r["file_bytes"] for r in rows[1:])
    grouped = next(r for r in rows if r["method"].startswith("+ per-group"))
    assert grouped["compressor"] in ("grouped+per-group", "int8+zlib", "packed+zlib")
    base, int8, int6, ours = rows[:4]
    assert int8["compressor"] == "int8+zlib" and int8["bits"] == 8
    assert ours["method"].endswith("gptq int6/emb8") and int6["method"].endswith("rtn int6/emb8")
    for r in rows[1:]:
        assert r["model_bytes"] > 0 and r["gap_bpb"] == pytest.approx(r["val_bpb"] - base["val_bpb"])
    assert int6["model_bytes"] < int8["model_bytes"]
    assert 0 < base["val_bpb"] < 20 and abs(int8["gap_bpb"]) < abs(int6["gap_bpb"]) + 0.05
    table = format_compare(rows)
    assert "int8 rtn percentile + zlib (baseline)" in table and f"{base['val_bpb']:.4f}" in table
    assert "+0 B +0.0000 bpb" in table  # the configured row against itself


def test_check_cap_false_returns_the_overage_instead(cfg, run_dir):
    c = cfg.with_overrides(size_cap_bytes=20_000, quant_method="rtn")
    res = quantize(c, run_dir, code_bytes=5_000, check_cap=False)
    assert res.over_cap == res.total_bytes - 20_000 > 0
    from dataclasses import asdict

    assert "entries" not in asdict(res) and len(res.entries) == len(res.rows)


def test_calibrate_with_nothing_to_calibrate_is_not_an_error(cfg, run_dir):
    c = cfg.with_overrides(passthrough_max_numel=65_536)  # every debug linear is fp16 passthrough
    res = calibrate(c, run_dir)
    assert res.n_hessians == 0 and res.tokens == 0
    assert torch.load(res.path, weights_only=True)["hessians"] == {}
    assert json.loads(quantize(c, run_dir).report_path.read_text())["fallbacks"] == []


def test_frontier_elements_through_the_stage_count_every_byte(cfg, run_dir):
    """All frontier elements on the debug GPT: the file is the counted bytes and loads strict."""
    from pgolf.quantize.compare import frontier_overrides

    c = cfg.with_overrides(**frontier_overrides(compressor="auto", awq_lite_group_size=32, passthrough_max_numel=1024))
    calibrate(c, run_dir)
    res = quantize(c, run_dir, code_bytes=1000)
    art = run_dir / "artifact.pgz"
    assert res.model_bytes == art.stat().st_size and res.total_bytes == art.stat().st_size + 1000
    report = json.loads((run_dir / "quant_report.json").read_text())
    assert report["model_bytes"] == art.stat().st_size and "grouped+per-group" in report["candidates"]
    assert min(report["candidates"].values()) == art.stat().st_size
    assert [g["segment"] for g in report["groups"]][0] == "rest"
    methods = {t["name"]: t for t in report["tensors"]}
    assert methods["blocks.0.attn.gate.weight"]["method"] == "int8-row"
    assert sum(t["lowrank"] > 0 for t in methods.values()) == 3
    assert any("AWQ-lite" in t["note"] for t in methods.values())
    # the GPT's `final_norm` module gives the tied embedding its head-input Hessian: GPTQ, no fallback
    assert methods["tok_emb.weight"]["bits"] == 7 and "gptq" in methods["tok_emb.weight"]["method"]
    assert not any("tok_emb.weight" in f for f in report["fallbacks"])
    state = load_artifact(art)
    model = GPT(c.model)
    model.load_state_dict(state, strict=True)
    mem = dequantize_in_memory(res.entries)
    assert all(torch.equal(state[k], mem[k]) for k in state)
