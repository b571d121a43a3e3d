"""`make gpu-check`: the seed stacks at full size on ONE GPU, projected to the 8 x H100 record run.

    PYTHONPATH=src python bench/gpu_check.py                     # on the GPU machine, ~4-5 min
    PYTHONPATH=src python bench/gpu_check.py --device cpu --shape debug --steps 2   # logic dry run

For each preset (`seed`, `seed-plus`): the trainer's model and optimizers, compiled (TORCH_COMPILE
rule), FlashAttention 3 if importable else SDPA, one micro-batch of 48 x 2048 per forward:
  train   ms per micro-step (fwd+bwd) and per optimizer step after warm-up, tokens/s, MFU, peak memory
  eval    sliding-window scoring throughput (windows/s, targets/s), compile warm-up
  ttt     one rank's score-first TTT optimizer step (its share of TTT_BATCH_SEQS), time per TTT chunk
  8 GPUs  projected step time (with an all-reduce estimate), steps reached in the 600 s cap,
          full sliding and TTT eval times
Tokens are random (no data needed). Needs nothing but PyTorch (+ numpy, sentencepiece imported by
pgolf); no network, no pip. A deadline (--deadline-s, default 270 s) skips sections that would not fit,
and a watchdog 30 s later writes what was measured and exits, so a hung compile cannot pass ~5 min. Writes a table to stdout and
JSON to bench/gpu/<yyyymmdd>-<gpu>.json (CPU dry runs: bench/results/).
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
                      "tokens_per_s": 7.89e6, "peak_memory_mib": 21374, "sliding_eval_s": 94.8}}
EXIT_NO_CUDA = 2
EXIT_DEADLINE = 3


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

    from pgolf.attention import attention_backend_in_use

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
    """Warm-up (compile) then `steps` x (micro-step + optimizer step); medians in ms."""
    import torch

    runner = B.StepRunner(cfg, device)
    from pgolf.compiled import is_compiled

    compiled = is_compiled(runner.model_fn)
    t0 = time.perf_counter()
    for _ in range(2):  # the first compiles forward+backward; the second catches recompiles
        runner.micro_step()
        runner.opt_step()
    warmup_s = time.perf_counter() - t0
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
    out = {
        "micro_batch": f"{t.micro_batch_seqs}x{t.train_seq_len}", "micro_tokens": runner.micro_tokens,
        "params": runner.model.num_params(), "matmul_params": B.matmul_params(m), "compiled": compiled,
        "attention_backend": runner.model.attention_backend(device), "warmup_s": warmup_s, "timed_steps": steps,
        "micro_ms": 1e3 * micro_s, "micro_ms_min": 1e3 * min(micro), "opt_ms": 1e3 * opt_s, "ns_ms": 1e3 * ns,
        "tokens_per_s": tok_s, "one_gpu_step_ms": 1e3 * one_gpu_step_s, "one_gpu_accum": runner.accum,
        "train_flops_per_token": flops, "mfu": tok_s * flops / peak if peak else None,
        "grad_allreduce_bytes": grad_bytes, "muon_allreduce_bytes": muon_bytes,
    }
    if device.type == "cuda":
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    else:
        out["peak_memory_mib"] = None
    return out


def measure_eval(cfg, device, batches: int, ttt_steps: int, gpus: int, deadline: Deadline) -> dict[str, Any]:
    """Sliding-window scoring and one rank's TTT step, through the evaluator's own functions."""
    import numpy as np
    import torch

    from pgolf.evaluate.score import Tally, score_windows
    from pgolf.evaluate.ttt import Adapter, select_trainable
    from pgolf.evaluate.windows import plan_windows
    from pgolf.compiled import is_compiled, maybe_compiled
    from pgolf.model import build_model

    e, seq = cfg.eval, cfg.eval_seq_len
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
    adapter = Adapter(model_fn, [p for _, p in trainable], seq_len=seq, batch_seqs=rows, grad_clip=e.ttt_grad_clip,
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
    return out


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
    p.add_argument("--presets", default="seed,seed-plus", help="comma-separated stacks (default: seed,seed-plus)")
    p.add_argument("--shape", default=None, help="run the stacks at this preset's size (default: full size)")
    p.add_argument("--micro-batch", type=int, default=48, help="sequences per forward (default 48; 0 = the shape's)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps after warm-up (default 10)")
    p.add_argument("--eval-batches", type=int, default=6, help="timed scoring batches (default 6)")
    p.add_argument("--ttt-steps", type=int, default=4, help="timed TTT steps (default 4)")
    p.add_argument("--deadline-s", type=float, default=270.0,
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
        print(f"  {name} train: {entry['train']['micro_ms']:.2f} ms/micro-step ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        _release(cuda)
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
    report["notes"].append("projection: step = accum*micro + (opt - NS) + NS/gpus + ring all-reduce(grads fp32 + "
                           "Muon bf16 updates) at the assumed bus bandwidth; eval = warm-up + windows/(gpus*rate)")
    B.write_json(out_path, report)
    print(table(report))
    print(out_path.read_text(), end="")
    print(f"wrote {out_path} ({report['wall_s']:.0f} s)")
    return 0


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
