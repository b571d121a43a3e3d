"""`make bench`: the CPU benchmark report (JSON + markdown + PNG in bench/results/).

    .venv/bin/python bench/cpu.py                 # tiny shape, 100 steps per stack, 32K val tokens
    .venv/bin/python bench/cpu.py --quick         # seconds: debug shape, 8 steps, 8K val tokens

Every figure is measured in this run, on the offline corpus (data/offline, built on first use):
  1. training throughput, `baseline` vs `seed-plus` at the same shape, steps interleaved A B A B
  2. quality A/B at equal steps: `baseline`, `seed`, `seed-plus` stacks at one shape (bench.at_shape),
     each through train -> calibrate (GPTQ stacks) -> quantize with its own quantizer -> evaluate:
     val_bpb before quantization (rows), after (rows), after score-first TTT
  3. quantizer: int8 RTN + zlib (the naive baseline's) vs int6 GPTQ + best compressor on the SAME
     seed-plus weights (pgolf.quantize.compare.compare_methods)
  4. evaluation throughput (targets/s) of rows, sliding and TTT on the seed-plus artifact
  5. `make demo` phases: from the newest tiny run folder under runs/ (metrics.jsonl, summary.json,
     quant_report.json), else the same stages timed in step 2 for the seed-plus stack
  6. step overheads (pgolf.bench.perf): the compiled train step with QAT off vs on (kernels, ms), Newton-Schulz
     eager vs compiled, gradient averaging on 2 gloo ranks (flat after backward vs DDP buckets during
     it), host-to-device copies of the scoring loop
  7. compression at full size (pgolf.bench.perf): a seed-size int6 body drawn from the seed-plus artifact's own
     value distributions; the previous selection (threads) vs processes + probe, seconds and bytes
  8. evaluator extras (`--pieces evalx`, off by default): on one seed-plus artifact, sliding and TTT with
     the token-only n-gram tilt, AsymLogit and both, side by side with neither; sliding at an eval context
     1.25x the training context (2560/2048) with and without NTK RoPE; the tilt's precompute (tokens/s,
     peak memory) on real text at growing sizes, projected to the 47,851,520-token validation stream
  9. frontier quantizer elements (`--pieces quantx`, off by default; PRs #1855, #1908, #2135) on the SAME
     trained seed-plus weights: each element switched on alone (bytes and bpb change vs the configured
     quantizer), then all of them; and the full-size (#1855 shapes, 35.9M parameters) artifact bytes
     estimated from a synthetic body, seed quantizer vs frontier quantizer (pgolf.quantize.estimate)

`--pieces quality,step,compress` picks pieces (quality = 1-5); `--pieces step,compress` runs in minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from pgolf import bench as B  # noqa: E402

STACKS = ("baseline", "seed", "seed-plus")
DEFAULTS = {"shape": "tiny", "steps": 100, "val_tokens": 32768, "rounds": 6}
QUICK = {"shape": "debug", "steps": 8, "val_tokens": 8192, "rounds": 2}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextmanager
def timed(into: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        into[name] = round(time.perf_counter() - t0, 3)


# ---------------------------------------------------------------------------------------------
# data


def prepare_data(offline_dir: Path, work: Path, val_tokens: int, caseops: bool = False) -> Path:
    """The offline dataset (CaseOps-transformed with `caseops`); with val_tokens > 0, a copy whose val
    split and byte sidecar are cut to that many tokens (train shards linked, not copied). The tokenizer
    path stays the offline one."""
    import numpy as np

    from pgolf.data.offline import prepare_offline
    from pgolf.data.shards import read_shard, shard_paths, sidecar_paths, write_shard

    data = Path(prepare_offline(offline_dir, caseops=caseops))
    if not val_tokens:
        return data
    out = work / ("data-caseops" if caseops else "data")
    out.mkdir(parents=True, exist_ok=True)
    for p in shard_paths(data, "train"):
        link = out / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
    for name, paths in (("fineweb_val_000000.bin", shard_paths(data, "val")),
                        ("fineweb_val_bytes_000000.bin", sidecar_paths(data, "val"))):
        if paths:  # the sidecar holds one entry per val token: cut alike
            part = np.concatenate([np.asarray(read_shard(p)) for p in paths])[: val_tokens + 1]
            write_shard(out / name, part.astype(np.uint16))
    return out


def stack_config(stack: str, args: argparse.Namespace, data: Path, offline_dir: Path, val_fraction: float = 1.0):
    """The stack at the bench's shape, on `data`. With a cut val split (val_fraction < 1) the TTT chunk
    shrinks by the same fraction (whole sequences), so TTT still adapts as many times as on the full split."""
    cfg = B.at_shape(stack, args.shape, args.steps)
    tok = Path(cfg.data.tokenizer_path)
    if not tok.is_absolute():  # the shape's tokenizer (data/offline/tokenizer.model) lives with the corpus
        tok = offline_dir / tok.name
    seq = cfg.eval_seq_len
    chunk = max(seq, round(cfg.eval.ttt_chunk_tokens * val_fraction / seq) * seq)
    # no wallclock cap: every stack runs exactly `steps` steps, however busy the machine is
    return cfg.with_overrides(data_path=str(data), tokenizer_path=str(tok), val_loss_every=0, device="cpu",
                              max_wallclock_seconds=0, train_log_every=max(1, args.steps // 10),
                              ttt_chunk_tokens=chunk)


# ---------------------------------------------------------------------------------------------
# 1. training throughput


def throughput(cfgs: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Whole optimizer steps (fwd+bwd+optimizer) on random tokens, stacks interleaved; medians."""
    runners = {name: B.StepRunner(cfg, "cpu") for name, cfg in cfgs.items()}
    times = B.interleaved({name: r.step for name, r in runners.items()}, rounds=rounds, warmup=1)
    out: dict[str, Any] = {"rounds": rounds, "stacks": {}}
    for name, r in runners.items():
        step_s = B.median(times[name])
        tokens = r.cfg.train.train_batch_tokens
        out["stacks"][name] = {"params": r.model.num_params(), "step_ms": 1e3 * step_s,
                               "step_ms_all": [round(1e3 * t, 2) for t in times[name]],
                               "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
                               "train_flops_per_token": B.train_flops_per_token(r.cfg.model, r.cfg.train.train_seq_len)}
    names = list(runners)
    if len(names) == 2:
        a, b = names
        out["ratio"] = {"of": f"{b} / {a} tokens/s",
                        "value": out["stacks"][b]["tokens_per_s"] / out["stacks"][a]["tokens_per_s"]}
    return out


# ---------------------------------------------------------------------------------------------
# 2. one stack through the stages


def run_stack(cfg, run_dir: Path, sliding: bool) -> dict[str, Any]:
    from pgolf.evaluate import evaluate
    from pgolf.quantize import calibrate, quantize
    from pgolf.train import train

    if run_dir.exists():
        shutil.rmtree(run_dir)
    phases: dict[str, float] = {}
    with timed(phases, "train"):
        tr = train(cfg, run_dir)
    if cfg.quant.quant_method == "gptq":
        with timed(phases, "calibrate"):
            calibrate(cfg, run_dir)
    evals: dict[str, Any] = {}
    with timed(phases, "eval_prequant"):
        evals["prequant"] = evaluate(cfg, run_dir, mode="rows", checkpoint=run_dir / "checkpoint" / "model.pt",
                                     summary_name="eval_prequant.json")
    with timed(phases, "quantize"):
        q = quantize(cfg, run_dir)
    with timed(phases, "eval_postquant"):
        evals["postquant"] = evaluate(cfg, run_dir, mode="rows", summary_name="eval_postquant.json")
    if sliding:
        with timed(phases, "eval_sliding"):
            evals["sliding"] = evaluate(cfg, run_dir, mode="sliding", summary_name="eval_sliding.json")
    with timed(phases, "eval_ttt"):
        evals["ttt"] = evaluate(cfg, run_dir, mode="ttt", summary_name="eval_summary.json")
    return {
        "run_dir": str(run_dir),
        "shape": B.describe_shape(cfg),
        "quant": f"{cfg.quant.quant_method} int{cfg.quant.matrix_bits}/emb{cfg.quant.embed_bits} {cfg.quant.row_clip}",
        "train": {"steps": tr.steps, "train_time_s": tr.train_time_ms / 1e3, "step_avg_ms": tr.step_avg_ms,
                  "tokens": tr.tokens_seen, "tokens_per_s": tr.tokens_seen / max(tr.train_time_ms / 1e3, 1e-9),
                  "val_bpb": tr.last_val_bpb, "pre_ema_val_bpb": tr.pre_ema_val_bpb,
                  "ema_decay": cfg.train.ema_decay},
        "bpb": {name: r.val_bpb for name, r in evals.items()},
        "model_bytes": q.model_bytes, "compressor": f"{q.layout}+{q.compressor}",
        "eval": {name: eval_rates(r) for name, r in evals.items()},
        "phases_s": phases,
        "loss_curve": loss_curve(run_dir / "metrics.jsonl"),
    }


def eval_rates(r) -> dict[str, Any]:
    parts = dict(r.parts)
    work = parts.get("score", 0.0) + parts.get("ttt", 0.0)
    return {"targets": r.targets, "eval_time_s": r.eval_time_s, "parts_s": parts, "ttt_steps": r.ttt_steps,
            "targets_per_s": r.targets / work if work > 0 else None,
            "targets_per_s_wall": r.targets / r.eval_time_s if r.eval_time_s > 0 else None}


def loss_curve(metrics: Path) -> list[tuple[int, float]]:
    out = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "train" and isinstance(ev.get("train_loss"), (int, float)):
                out.append((int(ev["step"]), float(ev["train_loss"])))
    return out


# ---------------------------------------------------------------------------------------------
# 3. quantizer on the same weights


def quantizer(cfg, run_dir: Path) -> dict[str, Any]:
    from pgolf.quantize.compare import compare_methods

    rows = compare_methods(cfg, run_dir, elements=False)
    fp32 = rows[0]["val_bpb"]
    naive = next(r for r in rows if "baseline" in r["method"])
    ours = next(r for r in rows if r["method"].startswith("configured"))
    return {"checkpoint": str(run_dir / "checkpoint" / "model.pt"), "fp32_val_bpb": fp32, "rows": rows,
            "naive": naive, "ours": ours,
            "bytes_ratio": ours["model_bytes"] / naive["model_bytes"] if naive["model_bytes"] else None}


# ---------------------------------------------------------------------------------------------
# 9. the frontier quantizer's elements


def quant_elements(cfg, run_dir: Path, quick: bool) -> dict[str, Any]:
    """Piece 9: compare_methods with the element rows on the bench's seed-plus run (trained here if the
    quality pieces did not run), and the #1855-shape byte estimate for the seed and frontier quantizers."""
    from dataclasses import replace

    from pgolf.config import resolve
    from pgolf.bench.perf import trained_artifact
    from pgolf.quantize.compare import compare_methods, frontier_overrides, with_deltas
    from pgolf.quantize.estimate import estimate_artifact_bytes, pr1855_shapes

    trained_artifact(cfg, run_dir)
    rows = with_deltas(compare_methods(cfg, run_dir, elements=True))
    fractions = (1 / 128, 1 / 64) if quick else (1 / 64, 1 / 32, 1 / 8)
    seed = resolve("seed", env={}).quant  # full-size settings (the bench shape scales PASSTHROUGH_MAX_NUMEL)
    frontier = replace(seed, **frontier_overrides())
    estimates = {name: estimate_artifact_bytes(pr1855_shapes(), q, fractions=fractions)
                 for name, q in (("seed quantizer", seed), ("frontier quantizer", frontier))}
    return {"checkpoint": str(run_dir / "checkpoint" / "model.pt"), "rows": rows, "estimates": estimates}


# ---------------------------------------------------------------------------------------------
# 5. the demo's phases


def latest_demo_run(runs_dir: Path) -> Path | None:
    """The newest run folder of the `tiny` preset (what `make demo` runs) that finished (summary.json)."""
    best: tuple[float, Path] | None = None
    for summary in runs_dir.glob("*/summary.json"):
        try:
            preset = json.loads((summary.parent / "config.json").read_text()).get("preset")
        except (OSError, ValueError):
            continue
        if preset == "tiny" and (best is None or summary.stat().st_mtime > best[0]):
            best = (summary.stat().st_mtime, summary.parent)
    return best[1] if best else None


def demo_phases_from_run(run: Path) -> dict[str, Any]:
    """Phase seconds of a pipeline run folder, from its own records (no re-run).

    `summary.json` `phases_s` (the pipeline's wall seconds per phase: train, calibrate, quantize,
    eval_postquant, eval) when present; otherwise they are pieced together from metrics.jsonl events and
    quant_report.json. Inside `train`: compile priming, the train clock and validation, as `train_detail_s`.
    """
    summary = json.loads((run / "summary.json").read_text())
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    detail: dict[str, float] = {}
    for ev in events:
        if ev.get("event") == "phase" and ev.get("phase") == "priming":
            detail["priming"] = float(ev.get("seconds", 0.0))
    detail["train_clock"] = float(summary.get("train_time_s") or 0.0)
    detail["validation"] = sum(float(ev.get("eval_time_ms", 0.0)) / 1e3 for ev in events if ev.get("event") == "val")
    if isinstance(summary.get("phases_s"), dict) and summary["phases_s"]:
        phases = {k: float(v) for k, v in summary["phases_s"].items()}
    else:
        phases = {"train": sum(detail.values()), "calibrate": float(summary.get("calib_time_s") or 0.0)}
        names = {"eval_prequant.json": "eval_prequant", "eval_postquant.json": "eval_postquant",
                 "eval_summary.json": "eval"}
        for ev in events:
            if ev.get("event") == "eval" and ev.get("summary") in names:
                phases[names[ev["summary"]]] = float(ev.get("eval_time_s", 0.0))
        report = run / "quant_report.json"
        if report.is_file():
            phases["quantize"] = float(json.loads(report.read_text()).get("seconds", 0.0))
    out: dict[str, Any] = {"source": f"run folder {run}", "run_id": run.name, "phases_s": phases,
                           "train_detail_s": detail, "steps": summary.get("steps"), "val_bpb": summary.get("val_bpb")}
    start = run / "environment.json"
    end = next((run / n for n in ("manifest.json", "summary.json") if (run / n).is_file()), None)
    if start.is_file() and end is not None:
        wall = end.stat().st_mtime - start.stat().st_mtime
        out["wall_s"] = wall
        out["other_s"] = max(wall - sum(phases.values()), 0.0)  # setup, builds, summary, final sync
    return out


def demo_phases(runs_dir: Path, seed_plus: dict[str, Any] | None, steps: int, shape: str) -> dict[str, Any]:
    run = latest_demo_run(runs_dir)
    if run is not None:
        try:
            return demo_phases_from_run(run)
        except (OSError, ValueError, KeyError) as exc:
            log(f"demo run {run} unreadable ({exc}); using the bench's own stage timings")
    if seed_plus is None:
        return {"source": "none", "phases_s": {}}
    phases = dict(seed_plus["phases_s"])
    return {"source": (f"no finished tiny run under {runs_dir}/; the same stages timed by this bench for the "
                       f"seed-plus stack (= the tiny preset) at shape {shape}, {steps} steps"),
            "phases_s": phases, "wall_s": sum(phases.values()), "other_s": 0.0}


# ---------------------------------------------------------------------------------------------
# 8. evaluator extras


FULL_VAL_TARGETS = 47_851_520  # the canonical CaseOps SP8192 validation stream (technique-spec §10)
EXTRAS = (  # (mode, label, overrides): the #2135 values, each extra alone and together
    ("sliding", "neither", {}),
    ("sliding", "n-gram tilt", {"ngram_tilt_enabled": True}),
    ("ttt", "neither", {}),
    ("ttt", "n-gram tilt", {"ngram_tilt_enabled": True}),
    ("ttt", "AsymLogit", {"asym_logit_rescale": True}),
    ("ttt", "tilt + AsymLogit", {"ngram_tilt_enabled": True, "asym_logit_rescale": True}),
)
NGRAM_PROBE = """
import json, resource, sys, time
import numpy as np, torch


def peak_rss_mb():  # this process's own high-water mark (ru_maxrss also counts the parent's, across exec)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


from pgolf.data.shards import read_shard, shard_paths
from pgolf.evaluate.ngram import build_hints
data, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
tokens = torch.zeros(n + 1, dtype=torch.int64)
filled = 0
for path in shard_paths(data, "train"):  # only the tokens needed, so the peak below is the builder's
    part = np.asarray(read_shard(path))[: n + 1 - filled]
    tokens[filled:filled + part.size] = torch.from_numpy(part.astype(np.int64))
    filled += part.size
tokens = tokens[:filled]
before = peak_rss_mb()
times, hints = [], None
for _ in range(2):  # the first call in a process also pays torch's one-time kernel start-up
    hints = None
    t0 = time.perf_counter()
    hints = build_hints(tokens, 16, 0.8, 2.625)
    times.append(time.perf_counter() - t0)
print(json.dumps({"targets": tokens.numel() - 1, "seconds_first": times[0], "seconds": times[1],
                  "hinted": hints.fired, "rss_before_mb": before, "rss_peak_mb": peak_rss_mb()}))
"""


def ensure_artifact(cfg, run_dir: Path) -> None:
    """run_dir/artifact.pgz (and its fp32 checkpoint) of `cfg`: the quality piece's, or trained here."""
    if (run_dir / "artifact.pgz").is_file() and (run_dir / "checkpoint" / "model.pt").is_file():
        return
    from pgolf.quantize import calibrate, quantize
    from pgolf.train import train

    if run_dir.exists():
        shutil.rmtree(run_dir)
    train(cfg, run_dir)
    if cfg.quant.quant_method == "gptq":
        calibrate(cfg, run_dir)
    quantize(cfg, run_dir)


def ngram_throughput(data: Path, sizes: list[int], threads: int) -> dict[str, Any]:
    """build_hints on the first n tokens of the offline train shards (real text), one child process per
    size (its peak RSS is the builder's), projected linearly and as n·log n to the full validation stream."""
    rows = []
    for n in sizes:
        proc = subprocess.run([sys.executable, "-c", NGRAM_PROBE, str(data), str(n), str(threads)],
                              capture_output=True, text=True, timeout=3600, env={**os.environ,
                              "PYTHONPATH": str(REPO / "src")})
        if proc.returncode != 0:
            raise RuntimeError(f"n-gram probe failed: {proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["targets_per_s"] = r["targets"] / r["seconds"]
        rows.append(r)
    big = rows[-1]
    scale = FULL_VAL_TARGETS / big["targets"]
    return {"rows": rows, "threads": threads, "projected_s_linear": big["seconds"] * scale,
            "projected_s_nlogn": big["seconds"] * scale * math.log(FULL_VAL_TARGETS) / math.log(big["targets"]),
            "projected_peak_mb": big["rss_before_mb"] + (big["rss_peak_mb"] - big["rss_before_mb"]) * scale}


def eval_extras(cfg, run_dir: Path, data: Path, threads: int, quick: bool) -> dict[str, Any]:
    """Piece 8: the evaluator's extras on one artifact, the eval context, and the precompute's speed."""
    from pgolf.evaluate import evaluate

    ensure_artifact(cfg, run_dir)
    rows = []
    for mode, label, over in EXTRAS:
        name = f"eval_x_{mode}_{label.replace(' ', '').replace('+', '_')}.json"
        r = evaluate(cfg.with_overrides(**over), run_dir, mode=mode, summary_name=name)
        rows.append({"mode": mode, "extras": label, "val_bpb": r.val_bpb, "hinted": r.ngram_hinted,
                     "ngram_s": r.parts.get("ngram", 0.0), "eval_time_s": r.eval_time_s, "ttt_steps": r.ttt_steps,
                     "softcaps": [r.softcap_pos, r.softcap_neg] if r.softcap_pos else None})
    train_seq = cfg.train.train_seq_len
    long_seq = train_seq * 5 // 4  # 2560 / 2048
    context = []
    for seq, ref in ((train_seq, 0), (long_seq, 0), (long_seq, train_seq)):
        c = cfg.with_overrides(eval_seq_len=seq, rope_ntk_ref_len=ref)
        r = evaluate(c, run_dir, mode="sliding", checkpoint=run_dir / "checkpoint" / "model.pt",
                     summary_name=f"eval_x_ctx{seq}_ntk{ref}.json")
        context.append({"eval_seq_len": seq, "rope_ntk_ref_len": ref, "val_bpb": r.val_bpb,
                        "eval_time_s": r.eval_time_s})
    sizes = [1 << 18, 1 << 20] if quick else [1 << 20, 1 << 21, 1 << 22, 6_000_000]
    return {"artifact": str(run_dir / "artifact.pgz"), "rows": rows, "context": context,
            "train_seq_len": train_seq, "token_order": cfg.eval.token_order,
            "token_threshold": cfg.eval.token_threshold, "token_boost": cfg.eval.token_boost,
            "precompute": ngram_throughput(data, sizes, threads)}


# ---------------------------------------------------------------------------------------------
# verdict, markdown, plot


def verdict(quality: dict[str, Any]) -> list[str]:
    if "baseline" not in quality:
        return []
    base = quality["baseline"]["bpb"]
    lines = []
    for stack in ("seed", "seed-plus"):
        if stack not in quality:
            continue
        q = quality[stack]["bpb"]
        parts = []
        for key, label in (("prequant", "before quantization"), ("postquant", "after quantization"),
                           ("ttt", "after TTT")):
            d = q[key] - base[key]
            parts.append(f"{label} {'better' if d < 0 else 'WORSE'} by {abs(d):.4f} bpb")
        final = q["ttt"] - base["ttt"]
        head = "beats" if final < 0 else "does NOT beat"
        lines.append(f"`{stack}` {head} `baseline` at equal steps: " + "; ".join(parts) + ".")
    return lines


def markdown(rep: dict[str, Any]) -> str:
    m, L = rep["machine"], []
    L += [f"# pgolf CPU benchmark, {rep['utc']}", ""]
    L += [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads); load average "
          f"{m['load_start']} at start, {m['load_end']} at end (other work on the machine adds noise: compare "
          f"ratios measured side by side, not absolute times). Bench wall time {rep['wall_s']:.0f} s"
          f"{' (--quick)' if rep['quick'] else ''}.", ""]
    L += [f"Shape for every stack: **{rep['shape']}** (preset `{rep['args']['shape']}`'s size; each stack keeps "
          f"its own architecture switches, optimizer settings and quantizer). Data: {rep['data']}.", ""]

    tp = rep.get("throughput")
    if tp:
        L += ["## 1. Training throughput (same shape, steps interleaved)", ""]
        rows = [(n, s["params"], s.get("train_flops_per_token"), s["step_ms"], s["tokens_per_s"])
                for n, s in tp["stacks"].items()]
        L += [B.format_table(("stack", "params", "train FLOPs/token", "median step ms", "tokens/s"), rows,
                             markdown=True), ""]
        if "ratio" in tp:
            L += [f"Ratio {tp['ratio']['of']}: **{tp['ratio']['value']:.3f}** (medians of {tp['rounds']} whole "
                  "optimizer steps each: fwd+bwd+optimizer on random tokens, the two stacks alternating)."]
            alls = [tp["stacks"][n].get("step_ms_all") for n in tp["stacks"]]
            if len(alls) == 2 and all(alls):
                # each round times the two stacks back to back, so a round's ratio shares the machine's load
                per_round = sorted(a / b for a, b in zip(*alls))
                L += [f"Per-round ratios (each pair timed back to back): median {B.median(per_round):.3f}, range "
                      f"{per_round[0]:.3f} to {per_round[-1]:.3f}; step ms: "
                      f"{'; '.join(f'{n} {v}' for n, v in zip(tp['stacks'], alls))}."]
            L += [""]

    q = rep.get("quality", {})
    if q:
        L += ["## 2. Quality A/B at equal steps (offline corpus val, exact bpb)", ""]
        rows = [(n, f"{r['quant']} {r.get('compressor', '')}", r["train"]["steps"], r["train"]["train_time_s"],
                 r["bpb"]["prequant"],
                 r["bpb"]["postquant"], r["bpb"].get("sliding"), r["bpb"]["ttt"], r["model_bytes"])
                for n, r in q.items()]
        L += [B.format_table(("stack", "quantizer", "steps", "train s", "pre-quant bpb", "post-quant bpb",
                              "sliding bpb", "TTT bpb", "model bytes"), rows, markdown=True), ""]
        t = rep.get("ttt", {})
        if t:
            L += [f"TTT: chunks of {t['chunk_tokens']:,} tokens, {t['epochs']} epochs, lr {t['lr']}, "
                  f"{t['batch_seqs']} sequences per step, last {t['unfreeze_blocks']} blocks + control parameters + "
                  f"embedding trainable; sliding stride {t['stride']}.", ""]
        L += ["Pre-quant: the fp32 EMA checkpoint (EMA where the stack has it), non-overlapping rows. Post-quant: "
              "the stack's own artifact (`baseline`: int8 RTN + zlib; seeds: int6 GPTQ + best compressor), rows. "
              "TTT: score-first TTT on that artifact with the same TTT settings for all three (the `baseline` "
              "preset itself scores rows only).", ""]
        steps = {r["train"]["steps"] for r in q.values()}
        if len(steps) > 1:
            L += [f"**Warning: the stacks ran different step counts ({sorted(steps)}); this is not an equal-steps "
                  "comparison.**", ""]
        L += [f"- {line}" for line in rep.get("verdict", [])] + [""]

    qz = rep.get("quantizer")
    if qz:
        L += ["## 3. Quantizer on the same weights (seed-plus checkpoint)", ""]
        rows = [(r["method"], r["compressor"], r["model_bytes"], r["val_bpb"], r["gap_bpb"]) for r in qz["rows"]]
        L += [B.format_table(("method", "layout+compressor", "model bytes", "val_bpb (rows)", "gap vs fp32"), rows,
                             markdown=True), ""]
        if qz.get("bytes_ratio"):
            L += [f"int6 GPTQ + best compressor is **{qz['bytes_ratio']:.3f}x** the bytes of int8 RTN + zlib, with a "
                  f"bpb gap of {qz['ours']['gap_bpb']:+.4f} vs {qz['naive']['gap_bpb']:+.4f}.", ""]

    ev = rep.get("eval_throughput")
    if ev:
        L += [f"## 4. Evaluation throughput ({ev['stack']} artifact, CPU)", ""]
        rows = [(mode, r["targets"], r["parts_s"].get("score"), r["parts_s"].get("ttt"), r["eval_time_s"],
                 r["targets_per_s"], r["targets_per_s_wall"]) for mode, r in ev["modes"].items()]
        L += [B.format_table(("mode", "targets", "score s", "TTT s", "eval clock s", "targets/s (score+TTT)",
                              "targets/s (eval clock)"), rows, markdown=True), ""]

    dm = rep.get("demo")
    if dm:
        L += ["## 5. `make demo` phases", "", f"Source: {dm['source']}.", ""]
        total = dm.get("wall_s") or sum(dm["phases_s"].values())
        order = ["train", "calibrate", "eval_prequant", "quantize", "eval_postquant", "eval_sliding", "eval_ttt", "eval"]
        items = sorted(dm["phases_s"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
        rows = [(k, v, f"{100 * v / total:.0f}%" if total else "-") for k, v in items]
        if dm.get("other_s"):
            rows.append(("other (setup, builds, writes, sync)", dm["other_s"],
                         f"{100 * dm['other_s'] / total:.0f}%" if total else "-"))
        L += [B.format_table(("phase", "seconds", "share"), rows, markdown=True), ""]
        if dm.get("train_detail_s"):
            L += ["Inside `train`: " + ", ".join(f"{k} {v:.1f} s" for k, v in dm["train_detail_s"].items()) + ".", ""]
        L += [f"Total: {total:.1f} s (corpus build and store start-up are outside the run folder and not counted).", ""]

    st = rep.get("step")
    if st:
        fq, ns, ov, cp = st["fake_quant"], st["newton_schulz"], st["overlap"], st["copies"]
        L += [f"## 6. Step overheads ({st['shape']})", ""]
        rows = [("train step, QAT off (every seed step now)", fq["kernels"]["qat_off"], fq["step_ms"]["qat_off"]),
                ("train step, QAT on (every step before: fake-quant always traced)", fq["kernels"]["qat_on"],
                 fq["step_ms"]["qat_on"])]
        L += [B.format_table(("compiled fwd+bwd", "generated kernels", "median ms"), rows, markdown=True), ""]
        L += [f"Newton-Schulz over {ns['matrices']} matrices: eager {ns['ms']['eager']:.1f} ms, compiled "
              f"{ns['ms']['compiled']:.1f} ms ({ns['graphs']} graphs, one per shape; {ns['compile_s']:.1f} s to "
              f"compile). Gradient averaging on {ov['world_size']} gloo ranks (eager fwd+bwd+average, "
              f"{ov['grad_mb']:.1f} MB of gradients): one flat all-reduce after backward "
              f"{ov['step_ms']['flat_after_backward']:.0f} ms vs {ov['buckets']} DDP buckets during backward "
              f"{ov['step_ms']['ddp_buckets']:.0f} ms (same gradients: {ov['same_gradients']}). Host-to-device "
              f"copies requested by the scoring loop: {cp['per_scoring_batch']:g} per batch, "
              f"{cp['per_evaluation']:g} per evaluation.", ""]
    cm = rep.get("compression")
    if cm:
        L += [f"## 7. Compression of a {cm['params']:,}-parameter int6 body ({cm['body_bytes']:,} B, "
              f"{cm['cores']} cores)", ""]
        rows = [("previous: 8 candidates on threads", cm["previous"]["seconds"], cm["previous"]["bytes"]),
                (f"now: processes ({cm['now']['workers']}) + probe, {len(cm['now']['skipped'])} skipped",
                 cm["now"]["seconds"], cm["now"]["bytes"])]
        L += [B.format_table(("selection", "seconds", "artifact bytes"), rows, markdown=True), ""]
        L += [f"Values drawn from `{cm['source']}` per tensor role (q values, row scales), at {cm['target']}. "
              f"Chosen: {cm['now']['choice']}; skipped by the probe: "
              f"{', '.join(f'{k} ({v:.3f}x)' for k, v in cm['now']['skipped'].items()) or 'none'}.", ""]

    ex = rep.get("eval_extras")
    if ex:
        L += [f"## 8. Evaluator extras (seed-plus artifact; tilt: order {ex['token_order']}, threshold "
              f"{ex['token_threshold']}, boost {ex['token_boost']})", ""]
        base = {r["mode"]: r["val_bpb"] for r in ex["rows"] if r["extras"] == "neither"}
        rows = [(r["mode"], r["extras"], r["val_bpb"], r["val_bpb"] - base[r["mode"]], r["hinted"], r["ngram_s"],
                 " / ".join(f"{v:.4f}" for v in r["softcaps"]) if r["softcaps"] else "-") for r in ex["rows"]]
        L += [B.format_table(("mode", "extras", "val_bpb", "vs neither", "hinted targets", "precompute s (eval clock)",
                              "caps s+ / s- after TTT"), rows, markdown=True), ""]
        rows = [(c["eval_seq_len"], c["rope_ntk_ref_len"] or "off", c["val_bpb"], c["eval_time_s"])
                for c in ex["context"]]
        L += [f"Eval context (fp32 checkpoint, sliding; trained at {ex['train_seq_len']}):", "",
              B.format_table(("eval seq len", "NTK RoPE ref", "val_bpb", "eval clock s"), rows, markdown=True), ""]
        pc = ex["precompute"]
        rows = [(r["targets"], r["seconds_first"], r["seconds"], r["targets_per_s"], r["hinted"],
                 r["rss_peak_mb"] - r["rss_before_mb"]) for r in pc["rows"]]
        L += [f"n-gram precompute on the offline train text (order 16), {pc['threads']} threads, one process per "
              "size (first call: with torch's one-time start-up; the rate is the second call's):", "",
              B.format_table(("targets", "first call s", "seconds", "targets/s", "hinted", "peak RSS growth MB"), rows,
                             markdown=True), "",
              f"Projected to the {FULL_VAL_TARGETS:,}-target validation stream on this CPU: "
              f"{pc['projected_s_linear']:.0f} s (linear) to {pc['projected_s_nlogn']:.0f} s (n log n), peak RSS "
              f"~{pc['projected_peak_mb'] / 1024:.1f} GB. On a GPU run the builder runs on the device.", ""]

    qe = rep.get("quant_elements")
    if qe:
        L += ["## 9. Frontier quantizer elements on the same weights (seed-plus checkpoint)", ""]
        rows = [(r["method"], r["compressor"], r["model_bytes"], r["d_bytes"], r["val_bpb"], r["d_bpb"],
                 len(r.get("fallbacks") or []) or "") for r in qe["rows"]]
        L += [B.format_table(("method", "layout+compressor", "model bytes", "Δ bytes vs configured", "val_bpb (rows)",
                              "Δ bpb vs configured", "fallbacks"), rows, markdown=True), ""]
        L += ["`+` rows switch one element on over the configured (seed-plus) quantizer; every byte is the artifact "
              "file. Fallbacks: the tied embedding has no head-input Hessian in this GPT (no `final_norm` module), "
              "so its int7 path is SDClip RTN here.", ""]
        est = qe["estimates"]
        rows = [(name, e["params"], e["choice"], e["measured_bytes"][-1], e["model_bytes"], e["seconds"])
                for name, e in est.items()]
        fr = next(iter(est.values()))["fractions"]
        L += ["Full-size estimate (PR #1855 shapes, Gaussian stand-in weights through the real quantizer and "
              f"compressors, built at row fractions {', '.join(f'{f:g}' for f in fr)} and extrapolated to all rows):", ""]
        L += [B.format_table(("quantizer", "params", "layout+compressor", f"bytes at {fr[-1]:g}", "estimated model bytes",
                              "seconds"), rows, markdown=True), ""]
    L += ["## Bench time by piece", ""]
    L += [B.format_table(("piece", "seconds"), list(rep["pieces_s"].items()), markdown=True), ""]
    L += ["## Reproduce", "", "```bash", "make bench                      # this report; BENCH_STEPS=... to change the steps",
          "make bench BENCH_QUICK=1        # seconds, debug shape (a smoke run, figures meaningless)", "```", ""]
    L += [f"JSON: `{rep['files']['json']}`; plot: `{rep['files']['png']}`.", ""]
    return "\n".join(L)


def plot(rep: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
    q = rep.get("quality", {})
    a = ax[0, 0]
    for name, r in q.items():
        if r["loss_curve"]:
            s, l = zip(*r["loss_curve"])
            a.plot(s, l, label=name)
    a.set(title="train loss", xlabel="step", ylabel="nats")
    a.legend()
    a = ax[0, 1]
    keys = [("prequant", "pre-quant"), ("postquant", "post-quant"), ("ttt", "TTT")]
    width = 0.8 / max(len(q), 1)
    for i, (name, r) in enumerate(q.items()):
        vals = [r["bpb"][k] for k, _ in keys]
        a.bar([j + i * width for j in range(len(keys))], vals, width, label=name)
    a.set_xticks([j + width * (len(q) - 1) / 2 for j in range(len(keys))], [lab for _, lab in keys])
    if q:
        allv = [r["bpb"][k] for r in q.values() for k, _ in keys]
        a.set_ylim(min(allv) - 0.05, max(allv) + 0.05)
    a.set(title="val_bpb at equal steps (lower is better)")
    a.legend()
    a = ax[0, 2]
    qz = rep.get("quantizer")
    if qz:
        for r in qz["rows"][1:]:
            a.scatter(r["model_bytes"], r["gap_bpb"])
            a.annotate(r["method"].split(":")[0][:28], (r["model_bytes"], r["gap_bpb"]), fontsize=7)
    a.set(title="quantizer: bytes vs bpb gap (same weights)", xlabel="model bytes", ylabel="bpb gap vs fp32")
    a = ax[1, 0]
    tp = rep.get("throughput")
    if tp:
        names = list(tp["stacks"])
        a.bar(names, [tp["stacks"][n]["tokens_per_s"] for n in names])
    a.set(title="training tokens/s (interleaved)")
    a = ax[1, 1]
    ev = rep.get("eval_throughput")
    if ev:
        modes = list(ev["modes"])
        a.bar(modes, [ev["modes"][m]["targets_per_s"] or 0 for m in modes])
    a.set(title="eval targets/s (score + TTT time)")
    a = ax[1, 2]
    dm = rep.get("demo")
    if dm and dm["phases_s"]:
        items = list(dm["phases_s"].items()) + ([("other", dm["other_s"])] if dm.get("other_s") else [])
        a.barh([k for k, _ in items], [v for _, v in items])
        a.invert_yaxis()
    a.set(title="demo phases (s)")
    fig.suptitle(f"pgolf CPU bench {rep['utc']}: {rep['shape']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/cpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="debug shape, 8 steps, 8K val tokens: a smoke run")
    p.add_argument("--shape", default=None, help=f"preset whose size every stack takes (default {DEFAULTS['shape']})")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per stack (default {DEFAULTS['steps']})")
    p.add_argument("--val-tokens", type=int, default=None,
                   help=f"cut the val split to N tokens (default {DEFAULTS['val_tokens']}; 0 = all ~126K)")
    p.add_argument("--rounds", type=int, default=None, help="timed steps per stack for throughput (default 6)")
    p.add_argument("--stacks", default=",".join(STACKS), help="comma-separated presets (default: all three)")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results", help="where the report goes")
    p.add_argument("--offline-dir", type=Path, default=REPO / "data" / "offline", help="offline corpus folder")
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs", help="where to look for the latest demo run")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    p.add_argument("--pieces", default="quality,step,compress",
                   help="comma-separated: quality (pieces 1-5), step (6), compress (7), evalx (8) and quantx (9), "
                        "the last two not in the default")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only rewrite the markdown and PNG beside an existing report JSON")
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def machine(threads: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "load_start": _load()}


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def render(path: Path, runs_dir: Path | None = None) -> None:
    """Markdown + PNG from a report JSON (the JSON is the record; these are views of it). With runs_dir,
    the demo section is first re-read from the newest finished demo run there, if there is one."""
    rep = json.loads(path.read_text())
    run = latest_demo_run(runs_dir) if runs_dir is not None else None
    if run is not None:
        rep["demo"] = demo_phases_from_run(run)
        B.write_json(path, rep)
    png = path.with_suffix(".png")
    rep.setdefault("files", {})["png"] = str(png) if plot(rep, png) else None
    B.write_text(path.with_suffix(".md"), markdown(rep))
    log(f"wrote {path.with_suffix('.md')}" + (f", {png}" if rep["files"]["png"] else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        render(args.render, args.runs_dir)
        return 0
    import torch

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    stamp = B.utc_stamp()
    out_dir = args.out_dir
    work = out_dir / f"{stamp}-runs"
    wanted = {p.strip() for p in args.pieces.split(",") if p.strip()}
    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()] if "quality" in wanted else []
    pieces: dict[str, float] = {}
    rep: dict[str, Any] = {"kind": "pgolf cpu bench", "utc": stamp, "quick": args.quick,
                           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           "machine": machine(args.threads)}

    with timed(pieces, "data"):
        data = prepare_data(args.offline_dir, work, args.val_tokens)
    from pgolf.data.loader import load_val_tokens

    n_val, n_full = len(load_val_tokens(data)) - 1, len(load_val_tokens(args.offline_dir)) - 1
    cfgs = {s: stack_config(s, args, data, args.offline_dir, n_val / n_full) for s in stacks}
    any_cfg = next(iter(cfgs.values()), None) or stack_config("seed-plus", args, data, args.offline_dir)
    rep["shape"] = B.describe_shape(any_cfg)
    rep["ttt"] = {"chunk_tokens": any_cfg.eval.ttt_chunk_tokens, "epochs": any_cfg.eval.ttt_epochs,
                  "lr": any_cfg.eval.ttt_lr, "batch_seqs": any_cfg.eval.ttt_batch_seqs,
                  "unfreeze_blocks": any_cfg.eval.ttt_unfreeze_blocks, "stride": any_cfg.eval.eval_stride}
    rep["data"] = (f"{data} ({n_val:,} of the {n_full:,} val targets"
                   f"{', cut with --val-tokens' if n_val < n_full else ''})")
    log(f"shape {rep['shape']}; stacks {', '.join(stacks)}; work dir {work}")

    pair = {s: cfgs[s] for s in ("baseline", "seed-plus") if s in cfgs}
    if len(pair) == 2:
        log(f"1/5 training throughput, {args.rounds} interleaved steps each")
        with timed(pieces, "throughput"):
            rep["throughput"] = throughput(pair, args.rounds)
        log(f"    ratio {rep['throughput']['ratio']['of']} = {rep['throughput']['ratio']['value']:.3f}")

    rep["quality"] = {}
    for i, s in enumerate(stacks):
        log(f"2/5 quality: {s} ({i + 1}/{len(stacks)}): train {args.steps} steps, quantize, evaluate")
        with timed(pieces, f"quality {s}"):
            rep["quality"][s] = run_stack(cfgs[s], work / s, sliding=(s == "seed-plus"))
        r = rep["quality"][s]
        log(f"    {s}: pre {r['bpb']['prequant']:.4f} post {r['bpb']['postquant']:.4f} ttt {r['bpb']['ttt']:.4f} "
            f"bpb ({pieces[f'quality {s}']:.0f} s)")
    rep["verdict"] = verdict(rep["quality"])

    if "seed-plus" in rep["quality"]:
        log("3/5 quantizer: int8 RTN + zlib vs int6 GPTQ + best compressor on the seed-plus weights")
        with timed(pieces, "quantizer"):
            rep["quantizer"] = quantizer(cfgs["seed-plus"], work / "seed-plus")
        log("4/5 evaluation throughput (from the seed-plus evaluations)")
        rep["eval_throughput"] = {"stack": "seed-plus", "modes": {
            "rows": rep["quality"]["seed-plus"]["eval"]["postquant"],
            "sliding": rep["quality"]["seed-plus"]["eval"]["sliding"],
            "ttt": rep["quality"]["seed-plus"]["eval"]["ttt"]}}

    if "quality" in wanted:
        log("5/5 demo phases")
        rep["demo"] = demo_phases(args.runs_dir, rep["quality"].get("seed-plus"), args.steps, args.shape)

    if "step" in wanted:
        log("6/7 step overheads: fake-quant in the compiled step, Newton-Schulz, gradient overlap (2 gloo ranks), "
            "copies")
        from pgolf.bench import perf

        with timed(pieces, "step overheads"):
            rep["step"] = perf.step_overheads(stack_config("seed-plus", args, data, args.offline_dir), args.rounds)
    if "compress" in wanted:
        log("7/7 compression of a full-size int6 body: previous (threads) vs processes + probe")
        from pgolf.bench import perf

        with timed(pieces, "compression"):
            rep["compression"] = perf.compression_at_full_size(
                stack_config("seed-plus", args, data, args.offline_dir), work / "seed-plus", args.quick)

    if "evalx" in wanted:
        log("8/8 evaluator extras: n-gram tilt, AsymLogit, eval context; the tilt's precompute speed")
        with timed(pieces, "eval extras"):
            rep["eval_extras"] = eval_extras(cfgs.get("seed-plus") or stack_config(
                "seed-plus", args, data, args.offline_dir, n_val / n_full), work / "seed-plus", args.offline_dir,
                args.threads, args.quick)
        for r in rep["eval_extras"]["rows"]:
            log(f"    {r['mode']:8s} {r['extras']:17s} {r['val_bpb']:.5f} bpb, {r['hinted']} hinted")
    if "quantx" in wanted:
        log("9/9 frontier quantizer elements on the seed-plus weights; full-size byte estimate")
        with timed(pieces, "quantizer elements"):
            rep["quant_elements"] = quant_elements(stack_config("seed-plus", args, data, args.offline_dir),
                                                   work / "seed-plus", args.quick)

    rep["pieces_s"] = pieces
    rep["wall_s"] = time.perf_counter() - t_start
    rep["machine"]["load_end"] = _load()
    paths = {ext: out_dir / f"{stamp}.{ext}" for ext in ("json", "md", "png")}
    rep["files"] = {k: str(v.relative_to(REPO)) if v.is_relative_to(REPO) else str(v) for k, v in paths.items()}
    if not plot(rep, paths["png"]):
        rep["files"]["png"] = None
    B.write_json(paths["json"], rep)
    B.write_text(paths["md"], markdown(rep))
    log(f"wrote {paths['json']}, {paths['md']}" + (f", {paths['png']}" if rep["files"]["png"] else " (no matplotlib: no PNG)"))
    for line in rep.get("verdict", []):
        log(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
