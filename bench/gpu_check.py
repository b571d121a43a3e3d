"""`make gpu-check`: the first contact with CUDA in one call (<= 6 min, one GPU, the machine's own torch).

    PYTHONPATH=src python bench/gpu_check.py                     # on the GPU machine, ~4-5 min
    PYTHONPATH=src python bench/gpu_check.py --device cpu --shape debug --micro-batch 0 --steps 2   # dry run

For each preset (default `seed`; `--presets seed,seed-plus` for both), at full size, through the
trainer's and evaluator's own compiled wrappers (pgolf.model.compiled: inductor, fullgraph):
  compile  the graphs each wrapper made against its plan: train_step (1, +1 with late QAT, compiled by
           flipping QAT once), newton_schulz (one per matrix shape), score and ttt_step (1 each), and
           no recompile during the timed steps
  attention  FA3 if importable, else SDPA (recorded)
  train    `--steps` (20) timed steps at the real micro-batch (48 x 2048): ms per micro-step and per
           optimizer step, tokens/s, MFU, peak memory
  gptq     one GPTQ of the largest full-size layer (the MLP projection, 512 x 1536) with a Hessian from
           random activations, through the quantizer's own routing
  eval     sliding-window scoring rate (windows/s), one rank's TTT step, and one whole TTT chunk as one of
           8 ranks runs it (score its share of the chunk's windows, then adapt on its share, all epochs)
  8 GPUs   projected step time (DDP's overlapped all-reduce), steps in the 600 s cap, sliding/TTT eval times
Tokens are random (no data needed). Needs nothing but PyTorch (+ numpy, sentencepiece imported by
pgolf); no network, no pip. A deadline (--deadline-s, default 300 s) skips sections that would not fit,
and a watchdog 30 s later writes what was measured and exits 3, so a hung compile cannot pass 6 min.
A failed check (compile counts) exits 4 after writing everything. Writes a table, then the JSON, to
stdout and to bench/gpu/<yyyymmdd>-<gpu>.json (CPU dry runs: bench/results/). Without CUDA: one
`error:` line, exit 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # works with or without PYTHONPATH=src, and with pgolf installed
    sys.path.insert(0, str(REPO / "src"))

from pgolf import bench as B  # noqa: E402

# FineWeb sp1024 val targets (the upstream loader's "val_loader ... tokens:62021632"; = 969,088 x 64,
# PR #490's window count in technique-spec §1.6); used when the shards are not on this machine
SP1024_VAL_TARGETS = 62_021_632
# what the record runs logged on 8 x H100 SXM (technique-spec §6), for comparison; NOT measured here
REFERENCE = {"seed": {"source": "technique-spec §6, PR #490 seed 1337 log", "step_avg_ms": 99.66, "steps": 6021,
                      "tokens_per_s": 7.89e6, "peak_memory_mib": 21374, "sliding_eval_s": 94.8},
             "frontier": {"source": "technique-spec §10, PR #2135 logs (3 seeds)", "step_avg_ms": 120.1,
                          "steps": 4994, "ttt_eval_s": 553.0}}
EXIT_NO_CUDA = 2
EXIT_DEADLINE = 3
EXIT_CHECK_FAILED = 4


# ---------------------------------------------------------------------------------------------
# deadline


class Deadline:
    """Soft deadline for sections (`allows`) and a hard one enforced by a watchdog thread."""

    def __init__(self, seconds: float, on_expire, grace_s: float = 30.0):
        self.t0 = time.perf_counter()
        self.seconds = seconds
        self._timer = threading.Timer(seconds + grace_s, on_expire) if seconds > 0 else None
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed() if self.seconds > 0 else math.inf

    def allows(self, need_s: float) -> bool:
        return self.left() >= need_s

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


# ---------------------------------------------------------------------------------------------
# measurements (each returns a plain dict)


def environment(device) -> dict[str, Any]:
    import torch

    from pgolf.model import attention_backend_in_use

    env: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
                           "python": sys.version.split()[0]}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_memory_mib=props.total_memory // 2**20,
                   sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    else:
        env["gpu"] = None
    env["attention_backend"] = attention_backend_in_use("auto", device)
    env["peak_bf16_tflops"] = (B.peak_bf16_flops(env["gpu"]) or 0) / 1e12 if env["gpu"] else None
    return env


def measure_train(cfg, device, steps: int) -> dict[str, Any]:
    """Compile (warm-up, + the QAT graph when the stack has late QAT), then `steps` x (micro-step +
    optimizer step); medians in ms; graphs per compiled wrapper against their plan."""
    import torch

    from pgolf.model.compiled import compile_counts, compile_events, is_compiled

    mark = len(compile_events())
    runner = B.StepRunner(cfg, device)
    compiled = is_compiled(runner.model_fn)
    qat = cfg.train.late_qat_threshold > 0
    t0 = time.perf_counter()
    for _ in range(2):  # the first compiles forward+backward and Newton-Schulz; the second catches recompiles
        runner.micro_step()
        runner.opt_step()
    if qat:  # the trainer primes late QAT's graph the same way, before its clock starts
        runner.model.set_qat(True)
        runner.micro_step()
        runner.model.set_qat(False)
        runner.opts.zero_grad()
    warmup_s = time.perf_counter() - t0
    warm_counts = compile_counts(mark)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    micro, opt = [], []
    for _ in range(steps):
        micro.append(runner.micro_step())
        opt.append(runner.opt_step())
    ns = B.median([runner.newton_schulz_s() for _ in range(3)])
    grad_bytes, muon_bytes = runner.grad_bytes()
    m, t = cfg.model, cfg.train
    micro_s, opt_s = B.median(micro), B.median(opt)
    flops = B.train_flops_per_token(m, t.train_seq_len)
    peak = B.peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    tok_s = runner.micro_tokens / micro_s
    one_gpu_step_s = runner.accum * micro_s + opt_s
    shapes = len({tuple(p.shape) for _, p in runner.model.param_groups()["matrix"]})
    out = {
        "micro_batch": f"{t.micro_batch_seqs}x{t.train_seq_len}", "micro_tokens": runner.micro_tokens,
        "params": runner.model.num_params(), "matmul_params": B.matmul_params(m), "compiled": compiled,
        "attention_backend": runner.model.attention_backend(device), "warmup_s": warmup_s, "timed_steps": steps,
        "micro_ms": 1e3 * micro_s, "micro_ms_min": 1e3 * min(micro), "opt_ms": 1e3 * opt_s, "ns_ms": 1e3 * ns,
        "step_ms": 1e3 * (micro_s + opt_s), "tokens_per_s": tok_s, "one_gpu_step_ms": 1e3 * one_gpu_step_s,
        "one_gpu_accum": runner.accum, "train_flops_per_token": flops, "mfu": tok_s * flops / peak if peak else None,
        "grad_allreduce_bytes": grad_bytes, "muon_allreduce_bytes": muon_bytes,
        "graphs": warm_counts, "graphs_expected": {"train_step": 2 if qat else 1, "newton_schulz": shapes}
        if compiled else {}, "recompiles_in_timed_steps": sum(compile_counts(mark).values()) - sum(warm_counts.values()),
    }
    if device.type == "cuda":
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    else:
        out["peak_memory_mib"] = None
    return out


def measure_gptq(cfg, device) -> dict[str, Any]:
    """One GPTQ of the largest block matrix at full size (MLP proj, d x mlp_hidden), Hessian from random
    activations of one micro-batch, through quantize_state_dict (row-scale search + GPTQ, as the stage)."""
    import torch

    from pgolf.quantize.quantizer import quantize_state_dict

    m, q, t = cfg.model, cfg.quant, cfg.train
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(m.model_dim, m.mlp_hidden, device=device, generator=g) * 0.02
    x = torch.randn(min(t.micro_batch_seqs * t.train_seq_len, 32_768), m.mlp_hidden, device=device, generator=g)
    h = (x.T @ x) / x.size(0)
    name = "blocks.0.mlp.proj.weight"
    B.sync(device)
    t0 = time.perf_counter()
    entries, rows, _ = quantize_state_dict({name: w}, q, {name}, {name: h}, device)
    B.sync(device)
    row = rows[0]
    return {"layer": name, "shape": list(w.shape), "hessian": list(h.shape), "method": row.method, "bits": row.bits,
            "seconds": time.perf_counter() - t0, "rel_err": row.rel_err, "out_err": row.out_err}


def measure_eval(cfg, device, batches: int, ttt_steps: int, gpus: int, deadline: Deadline) -> dict[str, Any]:
    """Sliding-window scoring and one rank's TTT step, through the evaluator's own functions."""
    import numpy as np
    import torch

    from pgolf.evaluate.score import Tally, score_windows
    from pgolf.evaluate.ttt import Adapter, select_trainable
    from pgolf.evaluate.windows import plan_windows
    from pgolf.model.compiled import compile_counts, compile_events, is_compiled, maybe_compiled
    from pgolf.model import build_model

    e, seq = cfg.eval, cfg.eval_seq_len
    mark = len(compile_events())
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, device)
    model.eval().requires_grad_(False)
    trainable = select_trainable(model, e.ttt_unfreeze_blocks)
    model_fn = maybe_compiled("score", model, cfg.model.torch_compile, device)
    compiled = is_compiled(model_fn)
    n_windows = (3 + batches) * e.eval_batch_seqs  # the first window (scores a whole row) is dropped below
    n_tokens = seq + (n_windows - 1) * e.eval_stride + 1
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (n_tokens,), generator=g).to(device)
    windows = plan_windows(n_tokens, seq, e.eval_stride)[1:]  # steady-state windows (stride targets each)
    groups = [windows[i:i + e.eval_batch_seqs] for i in range(0, len(windows), e.eval_batch_seqs)]
    groups = [gr for gr in groups if len(gr) == e.eval_batch_seqs]

    def score(group) -> float:
        B.sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():  # the TTT scoring context (sliding mode uses inference_mode)
            score_windows(model_fn, tokens, group, seq, e.eval_batch_seqs, e.ttt_temperature, compiled)
        B.sync(device)
        return time.perf_counter() - t0

    warm = score(groups[0]) + score(groups[1])
    times = [score(gr) for gr in groups[2:]]
    per_batch = B.median(times)
    targets_per_window = e.eval_stride
    out: dict[str, Any] = {
        "compiled": compiled, "eval_batch": f"{e.eval_batch_seqs}x{seq}", "stride": e.eval_stride,
        "score_warmup_s": warm, "timed_batches": len(times), "batch_ms": 1e3 * per_batch,
        "windows_per_s": e.eval_batch_seqs / per_batch,
        "targets_per_s": e.eval_batch_seqs * targets_per_window / per_batch,
        "trainable_params": sum(p.numel() for _, p in trainable),
    }
    if not deadline.allows(30.0 if device.type == "cuda" else 0.0):
        out["ttt"] = {"skipped": f"deadline: {deadline.left():.0f} s left"}
        return out
    rows = -(-e.ttt_batch_seqs // gpus)  # one rank's share of a TTT step
    ttt_fn = maybe_compiled("ttt_step", model, cfg.model.torch_compile, device)
    adapter = Adapter(ttt_fn, [p for _, p in trainable], seq_len=seq, batch_seqs=rows, grad_clip=e.ttt_grad_clip,
                      temperature=e.ttt_temperature, rank=0, world_size=1, pad_rows=compiled)
    adapter.set_lr(e.ttt_lr)
    span = rows * seq
    tally = Tally(np.ones(n_tokens - 1, dtype=np.int32), keep_per_token=False)
    tally.commit(0, n_tokens - 1)  # synthetic tokens: mark them scored so the score-first check passes

    def adapt(i: int) -> float:
        lo = (i * span) % max(n_tokens - 1 - span, 1)
        B.sync(device)
        t0 = time.perf_counter()
        adapter.adapt(tokens, lo, lo + span, tally, 1)
        B.sync(device)
        return time.perf_counter() - t0

    ttt_warm = adapt(0) + adapt(1)
    ttt_times = [adapt(2 + i) for i in range(ttt_steps)]
    out["ttt"] = {"rows_per_rank": rows, "warmup_s": ttt_warm, "timed_steps": len(ttt_times),
                  "step_ms": 1e3 * B.median(ttt_times),
                  "trainable_bytes": sum(p.numel() * p.element_size() for p in adapter.params)}
    out["ttt_chunk"] = one_ttt_chunk(cfg, model_fn, adapter, tokens, tally, gpus, compiled)
    out["graphs"] = compile_counts(mark)
    out["graphs_expected"] = {"score": 1, "ttt_step": 1} if compiled else {}
    return out


def one_ttt_chunk(cfg, model_fn, adapter, tokens, tally, gpus: int, pad_rows: bool) -> dict[str, Any]:
    """One TTT chunk as rank 0 of `gpus` runs it: score its share of the chunk's windows, then TTT_EPOCHS
    passes over its share of the chunk's sequences (the all-reduce of the gradients is not included)."""
    import torch

    from pgolf.evaluate.score import score_windows
    from pgolf.evaluate.windows import plan_windows

    e, seq = cfg.eval, cfg.eval_seq_len
    share = max(seq, e.ttt_chunk_tokens // gpus)  # this rank's targets of one chunk
    n = min(len(tokens), share + seq + 1)
    windows = plan_windows(n, seq, e.eval_stride)[1:]
    windows = windows[: max(1, -(-(e.ttt_chunk_tokens // e.eval_stride) // gpus))]
    B.sync(tokens.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        score_windows(model_fn, tokens, windows, seq, e.eval_batch_seqs, e.ttt_temperature, pad_rows)
    B.sync(tokens.device)
    score_s = time.perf_counter() - t0
    steps = adapter.adapt(tokens, 0, min(share, len(tokens) - 1), tally, e.ttt_epochs)
    B.sync(tokens.device)
    return {"chunk_tokens": e.ttt_chunk_tokens, "gpus": gpus, "windows": len(windows), "score_s": score_s,
            "adapt_steps": steps, "seconds": time.perf_counter() - t0}


def val_targets(cfg) -> tuple[int, str]:
    """(targets, where from): the val shards' token count minus one if present, else the sp1024 figure."""
    from pgolf.data.shards import read_header, shard_paths

    data = Path(cfg.data.data_path)
    if not data.is_absolute():
        data = REPO / data
    try:
        paths = shard_paths(data, "val")
    except Exception:
        paths = []
    if paths:
        return sum(read_header(p) for p in paths) - 1, str(data)
    return SP1024_VAL_TARGETS, "sp1024 constant (upstream val_loader tokens:62021632)"


def project(cfg, train: dict[str, Any], ev: dict[str, Any] | None, peak: float | None,
            cluster: B.Cluster) -> dict[str, Any]:
    t, e = cfg.train, cfg.eval
    out: dict[str, Any] = {"assumptions": {"gpus": cluster.gpus, "allreduce_busbw_gbs": cluster.busbw_gbs,
                                           "collective_latency_ms": cluster.latency_ms}}
    out["train"] = B.project_train(
        micro_ms=train["micro_ms"], opt_ms=train["opt_ms"], ns_ms=train["ns_ms"],
        grad_bytes=train["grad_allreduce_bytes"], muon_bytes=train["muon_allreduce_bytes"],
        train_batch_tokens=t.train_batch_tokens, micro_batch_seqs=t.micro_batch_seqs, seq_len=t.train_seq_len,
        gptq_reserve_s=t.gptq_reserve_seconds, flops_per_token=train["train_flops_per_token"], peak_flops=peak,
        cluster=cluster)
    if ev and "windows_per_s" in ev:
        n, source = val_targets(cfg)
        ttt = ev.get("ttt", {})
        out["eval"] = B.project_eval(
            n_targets=n, seq_len=cfg.eval_seq_len, stride=e.eval_stride, windows_per_s=ev["windows_per_s"],
            warmup_s=ev["score_warmup_s"], chunk_tokens=e.ttt_chunk_tokens, ttt_epochs=e.ttt_epochs,
            ttt_batch_seqs=e.ttt_batch_seqs, ttt_step_ms=ttt.get("step_ms"),
            trainable_bytes=ttt.get("trainable_bytes", 0), ttt_warmup_s=ttt.get("warmup_s", 0.0), cluster=cluster)
        out["eval"]["val_targets_source"] = source
    return out


# ---------------------------------------------------------------------------------------------
# report


def table(report: dict[str, Any]) -> str:
    heads = ("preset", "ms/micro", "tok/s 1gpu", "MFU", "peak MiB", "win/s", "TTT step ms", "8gpu step ms",
             "steps/600s", "sliding s", "TTT chunk s", "TTT s")
    rows = []
    for name, r in report["presets"].items():
        tr, ev, pj = r.get("train", {}), r.get("eval", {}), r.get("projection", {})
        p_tr, p_ev = pj.get("train", {}), pj.get("eval", {})
        rows.append((name, tr.get("micro_ms"), tr.get("tokens_per_s"),
                     None if tr.get("mfu") is None else f"{100 * tr['mfu']:.1f}%", tr.get("peak_memory_mib"),
                     ev.get("windows_per_s"), ev.get("ttt", {}).get("step_ms"), p_tr.get("step_ms"),
                     p_tr.get("steps_in_cap"), p_ev.get("sliding_total_s"), p_ev.get("ttt_chunk_s"),
                     p_ev.get("ttt_total_s")))
    return B.format_table(heads, rows)


def default_out(env: dict[str, Any], stamp: str) -> Path:
    if env.get("gpu"):
        slug = "".join(c if c.isalnum() else "-" for c in env["gpu"].lower()).strip("-")
        while "--" in slug:
            slug = slug.replace("--", "-")
        return REPO / "bench" / "gpu" / f"{stamp[:8]}-{slug}.json"
    return REPO / "bench" / "results" / f"gpu-check-cpu-{stamp}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run of the logic")
    p.add_argument("--presets", default="seed", help="comma-separated stacks (default: seed)")
    p.add_argument("--shape", default=None, help="run the stacks at this preset's size (default: full size)")
    p.add_argument("--micro-batch", type=int, default=48, help="sequences per forward (default 48; 0 = the shape's)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps after warm-up (default 20)")
    p.add_argument("--eval-batches", type=int, default=6, help="timed scoring batches (default 6)")
    p.add_argument("--ttt-steps", type=int, default=4, help="timed TTT steps (default 4)")
    p.add_argument("--deadline-s", type=float, default=300.0,
                   help="start no new section after this; the watchdog ends the run 30 s later (0 = none)")
    p.add_argument("--busbw-gbs", type=float, default=B.Cluster.busbw_gbs, help="all-reduce bus bandwidth, GB/s")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of the projected node (default 8)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/gpu/<yyyymmdd>-<gpu>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError as exc:
        print(f"error: gpu-check needs PyTorch with CUDA, but {sys.executable} cannot import torch ({exc}); run it "
              f"with the GPU machine's python (make gpu-check GPU_PYTHON=/path/to/python)", file=sys.stderr)
        return EXIT_NO_CUDA
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: gpu-check needs a CUDA device, but torch {torch.__version__} sees none "
              f"(torch.cuda.is_available() is False); run it on the GPU machine, or dry-run the logic with "
              f"--device cpu --shape debug", file=sys.stderr)
        return EXIT_NO_CUDA
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:  # set_device and friends want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    stamp = B.utc_stamp()
    env = environment(device)
    out_path = args.out or default_out(env, stamp)
    cluster = B.Cluster(gpus=args.gpus, busbw_gbs=args.busbw_gbs)
    report: dict[str, Any] = {"kind": "pgolf gpu-check", "utc": stamp, "environment": env,
                              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "presets": {}, "notes": []}

    def on_expire() -> None:  # the watchdog: whatever a hung compile left undone, keep what we have
        report["aborted"] = f"hard deadline {args.deadline_s + 30:.0f} s passed"
        B.write_json(out_path, report)
        print(f"error: gpu-check passed its hard deadline ({args.deadline_s + 30:.0f} s); partial results in "
              f"{out_path}", file=sys.stderr, flush=True)
        os._exit(EXIT_DEADLINE)

    deadline = Deadline(args.deadline_s, on_expire)
    cuda = device.type == "cuda"
    peak = B.peak_bf16_flops(env["gpu"]) if env.get("gpu") else None
    print(f"gpu-check: {env.get('gpu') or device} torch {env['torch']} attention {env['attention_backend']} "
          f"deadline {args.deadline_s:.0f} s", flush=True)
    cfgs = {}
    for name in [s.strip() for s in args.presets.split(",") if s.strip()]:
        cfg = B.at_shape(name, args.shape)
        if args.micro_batch:
            cfg = cfg.with_overrides(micro_batch_seqs=args.micro_batch)
        cfgs[name] = cfg
        report["presets"][name] = {"shape": B.describe_shape(cfg)}
        if name in REFERENCE and args.shape is None:
            report["presets"][name]["reference_8xh100"] = REFERENCE[name]

    # order: every training measurement first (the headline), then eval, so a tight deadline drops eval
    for name, cfg in cfgs.items():
        entry = report["presets"][name]
        if not deadline.allows(60.0 if cuda else 0.0):
            entry["train"] = {"skipped": f"deadline: {deadline.left():.0f} s left"}
            continue
        t0 = time.perf_counter()
        entry["train"] = measure_train(cfg, device, args.steps)
        print(f"  {name} train: {entry['train']['micro_ms']:.2f} ms/micro-step, graphs {entry['train']['graphs']} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        _release(cuda)
    first = next(iter(cfgs.values()), None)
    if first is not None and deadline.allows(20.0 if cuda else 0.0):
        report["gptq"] = measure_gptq(first, device)
        print(f"  gptq {report['gptq']['shape']}: {report['gptq']['seconds']:.2f} s", flush=True)
    for name, cfg in cfgs.items():
        entry = report["presets"][name]
        if not deadline.allows(50.0 if cuda else 0.0):
            entry["eval"] = {"skipped": f"deadline: {deadline.left():.0f} s left"}
            continue
        t0 = time.perf_counter()
        entry["eval"] = measure_eval(cfg, device, args.eval_batches, args.ttt_steps, args.gpus, deadline)
        print(f"  {name} eval: {entry['eval']['windows_per_s']:.1f} windows/s ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        _release(cuda)
    for name, cfg in cfgs.items():
        entry = report["presets"][name]
        if "micro_ms" in entry.get("train", {}):
            entry["projection"] = project(cfg, entry["train"], entry.get("eval"), peak, cluster)
    deadline.cancel()
    report["wall_s"] = deadline.elapsed()
    report["checks"] = checks(report)
    report["notes"].append("projection: step = accum*micro + (opt - NS) + NS/gpus + ring all-reduce of the last DDP "
                           "gradient bucket (the others overlap the backward) + Muon's bf16 updates, at the assumed "
                           "bus bandwidth; eval = warm-up + windows/(gpus*rate)")
    B.write_json(out_path, report)
    print(table(report))
    print(out_path.read_text(), end="")
    failed = [f"{k}: {v['detail']}" for k, v in report["checks"].items() if not v["ok"]]
    print(f"wrote {out_path} ({report['wall_s']:.0f} s)")
    for k, v in report["checks"].items():
        print(f"check {k}: {'ok' if v['ok'] else 'FAILED'} ({v['detail']})")
    if failed:
        print(f"error: gpu-check: {'; '.join(failed)}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What the call proves: compiled graphs as planned (and none during timed steps), the kernel in use."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in report["presets"].items():
        for section in ("train", "eval"):
            r = entry.get(section, {})
            if "graphs" not in r:
                continue
            ok = r["graphs"] == r["graphs_expected"] and not r.get("recompiles_in_timed_steps")
            out[f"{name} {section} compile"] = {
                "ok": ok, "detail": f"graphs {r['graphs']} expected {r['graphs_expected']}"
                + (f", {r['recompiles_in_timed_steps']} recompiles in the timed steps"
                   if r.get("recompiles_in_timed_steps") else "")}
    out["attention"] = {"ok": True, "detail": report["environment"]["attention_backend"]}
    return out


def _release(cuda: bool) -> None:
    """Drop compiled graphs and cached blocks between measurements (each builds a fresh model)."""
    import gc

    import torch

    gc.collect()
    if cuda:
        torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
