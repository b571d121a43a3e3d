"""bench/: stack-at-shape configs, FLOP counts, 8-GPU projections, report writers, gpu_check's CPU path."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pgolf import bench as B
from pgolf import config

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cpu_bench():
    return _load("cpu")


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check")


# ---- stacks at a shape ---------------------------------------------------------------------------


def test_seed_plus_at_tiny_shape_is_the_tiny_preset():
    tiny = config.resolve("tiny", env={})
    got = B.at_shape("seed-plus", "tiny")
    assert got.quant.passthrough_max_numel == 4096  # (128/512)^2 x 65,536: GPTQ still sees every block matrix
    assert got == replace(tiny, preset="seed-plus")


def test_each_stack_keeps_its_switches_at_the_shape():
    tiny = config.resolve("tiny", env={})
    base, seed = B.at_shape("baseline", "tiny"), B.at_shape("seed", "tiny")
    for cfg in (base, seed):  # same size for all
        assert (cfg.model.num_layers, cfg.model.model_dim, cfg.train.train_seq_len, cfg.train.train_batch_tokens,
                cfg.train.iterations) == (4, 128, 256, 8192, tiny.train.iterations)
    assert (base.model.mlp_activation, base.model.mlp_mult, base.model.bigram_buckets, base.model.smear_gate,
            base.model.value_residual, base.model.xsa_last_n) == ("relu2", 2.0, 0, False, False, 0)
    assert (base.train.matrix_lr, base.train.ema_decay, base.train.gptq_reserve_seconds) == (0.04, 0.0, 0.0)
    assert (base.quant.quant_method, base.quant.matrix_bits, base.quant.compressor) == ("rtn", 8, "zlib")
    assert (seed.model.bigram_buckets, seed.model.bigram_dim, seed.model.xsa_last_n, seed.model.ln_scale) == (
        1024, 64, 0, False)
    assert seed.model.rope_ntk_ref_len == 128  # 1024 at 2048 -> 128 at 256: still NTK-rescaled
    assert (seed.quant.quant_method, seed.quant.matrix_bits, seed.train.gptq_reserve_seconds) == ("gptq", 6, 5.0)
    # each source's init and input-path rules are part of its stack, not of the size
    assert (base.model.weight_init, seed.model.orthogonal_min_dim, seed.model.bos_mask) == ("default", 64, False)


def test_steps_rescale_the_schedule():
    t = config.resolve("tiny", env={}).train
    cfg = B.at_shape("seed", "tiny", steps=2 * t.iterations)
    # warm-down and Muon warm-up keep their fraction of the run; EMA decay 1 - 1/(0.1 * steps)
    assert (cfg.train.iterations, cfg.train.warmdown_iters, cfg.train.muon_momentum_warmup_steps) == (
        2 * t.iterations, 2 * t.warmdown_iters, 2 * t.muon_momentum_warmup_steps)
    assert cfg.train.ema_decay == pytest.approx(1 - 1 / (0.2 * t.iterations))
    assert B.at_shape("baseline", "tiny", steps=150).train.ema_decay == 0.0
    assert B.at_shape("seed", None) == config.resolve("seed", env={})


# ---- FLOPs and projections -----------------------------------------------------------------------


def test_flop_count_of_the_seed_by_hand():
    m = config.resolve("seed", env={}).model
    # per layer: q,o 512x512; k,v 512x256; MLP 2 x 512x1536; gate 512x8 -> x11; + bigram proj 128x512 + head 1024x512
    per_layer = 2 * 512 * 512 + 2 * 512 * 256 + 2 * 512 * 1536 + 512 * 8
    assert B.matmul_params(m) == 11 * per_layer + 128 * 512 + 1024 * 512 == 26_587_136
    attn = 2 * 11 * 8 * 64 * 2048  # causal QK^T + AV forward, per token
    assert B.train_flops_per_token(m, 2048) == 6 * 26_587_136 + 3 * attn
    assert B.forward_flops_per_token(m, 2048) == 2 * 26_587_136 + attn


def test_peak_flops_by_device_name():
    assert B.peak_bf16_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert B.peak_bf16_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert B.peak_bf16_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert B.peak_bf16_flops("Some CPU") is None


@pytest.mark.parametrize("n_tokens", [2, 10, 64, 65, 100, 257, 1000, 1234])
@pytest.mark.parametrize("seq_len,stride", [(64, 16), (64, 64), (100, 7)])
def test_window_count_matches_the_planner(n_tokens, seq_len, stride):
    from pgolf.evaluate.windows import plan_windows

    assert B.sliding_window_count(n_tokens - 1, seq_len, stride) == len(plan_windows(n_tokens, seq_len, stride))


def test_sp1024_window_count():
    # 62,021,632 targets: 1 + (62,021,632 - 2048) / 64 windows, no tail (PR #490 had 31 extra clipped ones)
    assert B.sliding_window_count(62_021_632, 2048, 64) == 969_057


def test_project_train_by_hand():
    cl = B.Cluster(gpus=8, busbw_gbs=400.0, latency_ms=0.05)
    # grads 4e8 B: 0.05 + 2*7/8 * 4e8 / 4e11 s = 0.05 + 1.75 ms; Muon 2e8 B: 0.05 + 0.875 ms
    assert B.allreduce_ms(4e8, cl) == pytest.approx(1.8)
    p = B.project_train(micro_ms=80.0, opt_ms=16.0, ns_ms=8.0, grad_bytes=4e8, muon_bytes=2e8,
                        train_batch_tokens=786_432, micro_batch_seqs=48, seq_len=2048, gptq_reserve_s=8.0,
                        flops_per_token=2e8, peak_flops=1e15, cluster=cl, grad_buckets=1)
    step = 80.0 + (16.0 - 8.0) + 8.0 / 8 + 1.8 + 0.925  # one micro-step per rank: 8 x 48 x 2048 = 786,432
    assert p["grad_accum_steps"] == 1
    assert p["step_ms"] == pytest.approx(step)
    assert p["steps_in_cap"] == int(592_000 // step)
    assert p["tokens_per_s"] == pytest.approx(786_432 / (step / 1000))
    assert p["mfu"] == pytest.approx(p["tokens_per_s"] * 2e8 / 8e15)
    assert B.allreduce_ms(4e8, B.Cluster(gpus=1)) == 0.0
    # DDP: 4e8 B in 25 MiB buckets = 16; only the last one's all-reduce is left after the backward
    overlapped = B.project_train(micro_ms=80.0, opt_ms=16.0, ns_ms=8.0, grad_bytes=4e8, muon_bytes=2e8,
                                 train_batch_tokens=786_432, micro_batch_seqs=48, seq_len=2048, gptq_reserve_s=8.0,
                                 flops_per_token=2e8, peak_flops=1e15, cluster=cl)
    assert overlapped["grad_buckets"] == 16
    assert overlapped["step_ms"] == pytest.approx(step - 1.8 + (0.05 + 1.75 / 16))


def test_project_eval_by_hand():
    cl = B.Cluster(gpus=8, busbw_gbs=400.0, latency_ms=0.0)
    p = B.project_eval(n_targets=1024 + 64 * 99, seq_len=1024, stride=64, windows_per_s=10.0, warmup_s=5.0,
                       chunk_tokens=2048, ttt_epochs=3, ttt_batch_seqs=4, ttt_step_ms=100.0, trainable_bytes=0,
                       ttt_warmup_s=2.0, cluster=cl)
    assert p["windows"] == 100
    assert p["sliding_total_s"] == pytest.approx(5.0 + 100 / 80)
    n_chunks = math.ceil(7360 / 2048)  # 4
    assert p["ttt_chunks"] == n_chunks
    assert p["ttt_steps_per_chunk"] == 3 * 1  # 2 sequences per chunk, 4 per step -> 1 step per epoch
    assert p["ttt_total_s"] == pytest.approx(5.0 + 2.0 + n_chunks * (100 / n_chunks / 80) + (n_chunks - 1) * 0.3)


def test_tables_and_json(tmp_path):
    text = B.format_table(("name", "value"), [("a", 1234.5), ("bb", None), ("c", 3.14159)])
    assert text.splitlines()[0].startswith("name") and "1,234" in text and "3.1416" in text and " -" in text
    md = B.format_table(("name", "value"), [("a", 1)], markdown=True)
    assert md.splitlines()[:2] == ["| name | value |", "|---|---:|"]
    path = B.write_json(tmp_path / "x" / "r.json", {"nan": float("nan"), "p": tmp_path, "ok": [1, 2.5]})
    assert json.loads(path.read_text()) == {"nan": None, "p": str(tmp_path), "ok": [1, 2.5]}


# ---- the CPU report ------------------------------------------------------------------------------


def _report() -> dict:
    quality = {}
    for name, bpb in (("baseline", 2.00), ("seed", 1.95), ("seed-plus", 2.01)):
        quality[name] = {"quant": "q", "train": {"steps": 10, "train_time_s": 1.0},
                         "bpb": {"prequant": bpb, "postquant": bpb + 0.01, "ttt": bpb - 0.02},
                         "model_bytes": 1000, "loss_curve": [(1, 7.0), (10, 5.0)], "phases_s": {"train": 1.0}}
    rates = {"targets": 100, "eval_time_s": 2.0, "parts_s": {"score": 1.0, "ttt": 0.5}, "targets_per_s": 66.7,
             "targets_per_s_wall": 50.0}
    rows = [{"method": "fp32", "compressor": "-", "model_bytes": None, "val_bpb": 2.0, "gap_bpb": 0.0},
            {"method": "int8 rtn (baseline)", "compressor": "int8+zlib", "model_bytes": 2000, "val_bpb": 2.001,
             "gap_bpb": 0.001},
            {"method": "configured", "compressor": "packed+lzma", "model_bytes": 1500, "val_bpb": 2.002,
             "gap_bpb": 0.002}]
    return {
        "utc": "20260101T000000Z", "quick": True, "wall_s": 12.0, "shape": "2 layers", "data": "data/offline",
        "args": {"shape": "debug"},
        "machine": {"cpu": "cpu", "cores": 2, "threads": 2, "torch": "x", "load_start": "0.1", "load_end": "0.2"},
        "throughput": {"rounds": 2, "stacks": {"baseline": {"params": 10, "step_ms": 10.0, "tokens_per_s": 100.0},
                                                "seed-plus": {"params": 12, "step_ms": 20.0, "tokens_per_s": 50.0}},
                       "ratio": {"of": "seed-plus / baseline tokens/s", "value": 0.5}},
        "quality": quality,
        "quantizer": {"rows": rows, "naive": rows[1], "ours": rows[2], "bytes_ratio": 0.75},
        "eval_throughput": {"stack": "seed-plus", "modes": {"rows": rates, "ttt": rates}},
        "demo": {"source": "test", "phases_s": {"train": 3.0, "eval": 1.0}, "wall_s": 5.0, "other_s": 1.0},
        "pieces_s": {"quality baseline": 1.0}, "files": {"json": "r.json", "png": "r.png"},
    }


def test_verdict_says_by_how_much(cpu_bench):
    lines = cpu_bench.verdict(_report()["quality"])
    assert lines[0].startswith("`seed` beats `baseline`") and "after TTT better by 0.0500 bpb" in lines[0]
    assert lines[1].startswith("`seed-plus` does NOT beat `baseline`") and "after TTT WORSE by 0.0100 bpb" in lines[1]


def test_markdown_and_plot(cpu_bench, tmp_path):
    rep = _report()
    rep["verdict"] = cpu_bench.verdict(rep["quality"])
    md = cpu_bench.markdown(rep)
    for heading in ("## 1. Training throughput", "## 2. Quality A/B", "## 3. Quantizer", "## 4. Evaluation",
                    "## 5. `make demo` phases", "## Reproduce"):
        assert heading in md
    assert "**0.500**" in md and "0.750x" in md and "does NOT beat" in md
    pytest.importorskip("matplotlib")
    assert cpu_bench.plot(rep, tmp_path / "r.png") and (tmp_path / "r.png").stat().st_size > 1000


def test_demo_phases_from_the_newest_tiny_run(cpu_bench, tmp_path):
    def make_run(name: str, preset: str, train_s: float) -> Path:
        run = tmp_path / name
        run.mkdir()
        (run / "environment.json").write_text("{}")
        (run / "config.json").write_text(json.dumps({"preset": preset}))
        events = [{"event": "phase", "phase": "priming", "seconds": 0.5},
                  {"event": "val", "eval_time_ms": 250.0}, {"event": "val", "eval_time_ms": 750.0},
                  {"event": "eval", "summary": "eval_prequant.json", "eval_time_s": 2.0},
                  {"event": "eval", "summary": "eval_summary.json", "eval_time_s": 4.0}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        (run / "quant_report.json").write_text(json.dumps({"seconds": 1.5}))
        (run / "summary.json").write_text(json.dumps({"train_time_s": train_s, "calib_time_s": 0.25, "steps": 3}))
        return run

    make_run("old", "tiny", 10.0)
    os.utime(tmp_path / "old" / "summary.json", (1, 1))
    make_run("other", "seed", 99.0)
    new = make_run("new", "tiny", 20.0)
    assert cpu_bench.latest_demo_run(tmp_path) == new
    got = cpu_bench.demo_phases(tmp_path, None, 10, "tiny")
    assert got["phases_s"] == {"train": 21.5, "calibrate": 0.25, "eval_prequant": 2.0, "eval": 4.0, "quantize": 1.5}
    assert got["train_detail_s"] == {"priming": 0.5, "train_clock": 20.0, "validation": 1.0}
    assert "wall_s" in got
    # the pipeline's own wall seconds per phase win when summary.json has them
    summary = json.loads((new / "summary.json").read_text())
    summary["phases_s"] = {"train": 25.0, "quantize": 2.0, "eval": 5.0}
    (new / "summary.json").write_text(json.dumps(summary))
    assert cpu_bench.demo_phases(tmp_path, None, 10, "tiny")["phases_s"] == {"train": 25.0, "quantize": 2.0,
                                                                              "eval": 5.0}
    fallback = cpu_bench.demo_phases(tmp_path / "none", {"phases_s": {"train": 2.0, "eval_ttt": 1.0}}, 10, "debug")
    assert fallback["wall_s"] == 3.0 and "no finished tiny run" in fallback["source"]


def test_quick_bench_writes_the_report(cpu_bench, offline_data, tmp_path):
    rc = cpu_bench.main(["--quick", "--pieces", "quality", "--stacks", "baseline,seed-plus", "--steps", "2",
                         "--val-tokens", "1024", "--rounds", "1", "--threads", "1", "--out-dir", str(tmp_path),
                         "--offline-dir", str(offline_data), "--runs-dir", str(tmp_path / "no-runs")])
    assert rc == 0
    reports = list(tmp_path.glob("*.json"))
    assert len(reports) == 1
    rep = json.loads(reports[0].read_text())
    assert rep["throughput"]["ratio"]["value"] > 0
    for stack in ("baseline", "seed-plus"):
        bpb = rep["quality"][stack]["bpb"]
        assert all(math.isfinite(bpb[k]) for k in ("prequant", "postquant", "ttt"))
        assert rep["quality"][stack]["train"]["steps"] == 2
    assert {r["method"].split(" ")[0] for r in rep["quantizer"]["rows"]} >= {"fp32", "int8", "configured"}
    assert set(rep["eval_throughput"]["modes"]) == {"rows", "sliding", "ttt"}
    assert rep["eval_throughput"]["modes"]["ttt"]["targets"] == 1024
    assert rep["demo"]["phases_s"]["train"] > 0
    assert reports[0].with_suffix(".md").read_text().startswith("# pgolf CPU benchmark")


# ---- gpu_check ---------------------------------------------------------------------------------


def test_gpu_check_fails_in_one_line_without_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path / "g.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gpu-check needs a CUDA device")
    assert not (tmp_path / "g.json").exists()


def test_gpu_check_imports_without_optional_packages():
    """The GPU machine has torch, triton, numpy, sentencepiece and nothing else we use."""
    code = (
        "import sys, importlib.abc\n"
        "BLOCK = ('tqdm', 'boto3', 'botocore', 'sky', 'matplotlib', 'huggingface_hub', 'zstandard', 'brotli',"
        " 'scipy', 'minify')\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCK: raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('gc', {str(REPO / 'bench' / 'gpu_check.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "import pgolf.config, pgolf.model, pgolf.train.optim, pgolf.evaluate, pgolf.evaluate.ttt, pgolf.data.shards\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_gpu_check_dry_run_on_cpu(gpu_check, tmp_path, capsys):
    """Every section of the GPU call at the debug size on the CPU (eager: TORCH_COMPILE is off on CPU)."""
    out = tmp_path / "gc.json"
    rc = gpu_check.main(["--device", "cpu", "--presets", "seed,seed-plus", "--shape", "debug", "--micro-batch", "0",
                         "--steps", "1", "--eval-batches", "1", "--ttt-steps", "1", "--out", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert set(rep["presets"]) == {"seed", "seed-plus"}
    for entry in rep["presets"].values():
        tr, ev, pj = entry["train"], entry["eval"], entry["projection"]
        assert tr["micro_ms"] > 0 and tr["compiled"] is False and tr["attention_backend"] == "sdpa"
        assert tr["step_ms"] == pytest.approx(tr["micro_ms"] + tr["opt_ms"])
        assert tr["graphs"] == tr["graphs_expected"] == {} and tr["recompiles_in_timed_steps"] == 0
        assert tr["train_flops_per_token"] == B.train_flops_per_token(B.at_shape("seed", "debug").model, 64)
        assert ev["windows_per_s"] > 0 and ev["ttt"]["step_ms"] > 0
        # one of 8 ranks' share of a 2,048-token chunk: 128 windows / 8; 32 sequences in steps of 8 (1 per rank), 1 epoch
        chunk = ev["ttt_chunk"]
        assert chunk["windows"] == 2048 // 16 // 8 and chunk["adapt_steps"] == 32 // 8
        assert chunk["seconds"] > chunk["score_s"] > 0
        assert pj["train"]["steps_in_cap"] > 0 and pj["eval"]["ttt_total_s"] > pj["eval"]["sliding_total_s"] > 0
        assert pj["train"]["grad_buckets"] == 1  # the debug model's gradients fit one 25 MiB DDP bucket
    gptq = rep["gptq"]
    assert gptq["method"] == "gptq" and gptq["shape"] == [64, 192] and gptq["hessian"] == [192, 192]
    assert 0 < gptq["rel_err"] < 0.2 and gptq["seconds"] > 0
    assert rep["checks"]["attention"] == {"ok": True, "detail": "sdpa"}
    assert all(c["ok"] for c in rep["checks"].values())
    printed = capsys.readouterr().out
    assert "ms/micro" in printed and '"kind": "pgolf gpu-check"' in printed and "check attention: ok" in printed


def test_gpu_check_fails_a_compile_count_that_is_off(gpu_check):
    rep = {"environment": {"attention_backend": "fa3"}, "presets": {"seed": {"train": {
        "graphs": {"train_step": 2, "newton_schulz": 6}, "graphs_expected": {"train_step": 1, "newton_schulz": 6},
        "recompiles_in_timed_steps": 1}}}}
    result = gpu_check.checks(rep)
    assert result["seed train compile"]["ok"] is False and "1 recompiles" in result["seed train compile"]["detail"]
    assert result["attention"] == {"ok": True, "detail": "fa3"}


def test_gpu_check_watchdog_fires_after_the_grace(gpu_check):
    import threading

    fired = threading.Event()
    d = gpu_check.Deadline(0.05, fired.set, grace_s=0.0)
    assert d.allows(0.0) and not d.allows(10.0)
    assert fired.wait(5.0)
    d2 = gpu_check.Deadline(0.05, fired.clear, grace_s=0.0)
    d2.cancel()  # a finished run cancels the watchdog
    assert gpu_check.Deadline(0, None).left() == math.inf


def test_frontier_at_a_smaller_shape_keeps_its_depth_layout_and_context_growth():
    """The looped span, the lanes and TRAIN_SEQ_SCHEDULE follow the shape: at `tiny` they are exactly the
    `frontier-tiny` preset's own choices (relative depths; lengths that divide the micro-batch)."""
    got, own = B.at_shape("frontier", "tiny"), config.resolve("frontier-tiny", env={})
    for f in ("loop_start", "loop_end", "parallel_start_layer", "num_loops", "num_layers"):
        assert getattr(got.model, f) == getattr(own.model, f), f
    assert config.parse_seq_schedule(got.train.train_seq_schedule, 256) == \
        config.parse_seq_schedule(own.train.train_seq_schedule, 256)
    with pytest.raises(config.ConfigError, match="PARALLEL_START_LAYER"):  # 2 layers hold no loop + lanes
        B.at_shape("frontier", "debug")


def test_every_ablation_element_is_a_real_knob_that_is_on_in_the_frontier_presets():
    """A renamed or removed knob would silently drop its row from `make bench-frontier`: every element's
    overrides name config fields, and each element is on in frontier, frontier-tiny and frontier-debug."""
    ablation = _load("ablation")
    for preset in ("frontier", "frontier-tiny", "frontier-debug"):
        cfg = config.resolve(preset, env={})
        missing = [el.label for el in ablation.ELEMENTS if not ablation.applies(cfg, el)]
        assert not missing, (preset, missing)
        for el in ablation.ELEMENTS:
            cfg.with_overrides(**el.off)  # switching it off is a valid config


def test_ablation_report_renders_the_committed_figures(tmp_path):
    ablation = _load("ablation")
    src = REPO / "bench" / "figures" / "frontier-20261202T103922Z.json"
    rep = json.loads(src.read_text())
    text = ablation.markdown(rep)
    assert text == src.with_suffix(".md").read_text()  # the committed markdown is a view of the JSON
    assert "| `frontier` | 855,285 |" in text and "no measurable effect" in text
