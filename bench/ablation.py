"""`make bench-frontier`: the frontier stack against `seed` and `baseline`, and one element at a time.

    .venv/bin/python bench/ablation.py                # tiny shape, 100 steps per run, 32K val tokens
    .venv/bin/python bench/ablation.py --quick        # seconds: debug shape, 6 steps (figures meaningless)

Every run trains the same number of steps on the same token stream (the offline corpus, sp1024 text, one
seed), so rows differ only by their configuration:
  1. stacks: `baseline`, `seed` and `frontier` (the frontier-tiny preset) each through train -> calibrate ->
     quantize -> its own final evaluation; val_bpb before quantization (rows), after (rows) and final
  2. model and training elements: `frontier` with ONE element switched off, trained again; val_bpb before
     quantization against the full frontier's (a positive delta = the element helps at this scale)
  3. evaluation elements: on the frontier's own artifact, the final evaluation with one element off
  4. the frontier on CaseOps-transformed text (data/offline-caseops), bpb through the byte sidecar

The report (JSON + markdown) goes to bench/results/frontier-<utc>.*; docs quote a committed copy in
bench/figures/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for p in (REPO / "src", REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from pgolf import bench as B  # noqa: E402

DEFAULTS = {"shape": "tiny", "frontier": "frontier-tiny", "steps": 100, "val_tokens": 32768}
QUICK = {"shape": "debug", "frontier": "frontier-debug", "steps": 6, "val_tokens": 8192}


@dataclass(frozen=True)
class Element:
    label: str
    off: dict[str, Any]  # the overrides that switch the element off in the frontier config
    source: str  # where the element comes from
    stage: str = "train"  # train: retrain without it; eval: re-evaluate the frontier artifact without it
    only_if: dict[str, Any] = field(default_factory=dict)  # skipped unless the frontier config has these


ELEMENTS = (
    Element("depth recurrence", {"num_loops": 0}, "#1855"),
    Element("parallel lanes", {"parallel_lanes": False}, "#1855"),
    Element("skip gates", {"skip_gates": False}, "#1855"),
    Element("SparseAttnGate", {"sparse_attn_gate": False}, "#1855"),
    Element("BOS SmearGate", {"bos_smear_gate": False}, "#1855"),
    Element("doc-isolated attention", {"doc_isolation": False}, "#1855"),
    Element("XSA on all layers", {"xsa_last_n": 0}, "#1855"),
    Element("QK gain 5.25 (seed 1.5)", {"qk_gain_init": 1.5}, "#1953"),
    Element("MLP 4x (seed 3x)", {"mlp_mult": 3.0}, "#1855"),
    Element("progress warmdown + LR floor", {"warmdown_frac": 0.0, "min_lr": 0.0}, "#1855"),
    Element("context growth", {"train_seq_schedule": "", "seq_change_warmup_steps": 0}, "#2014"),
    Element("Muon row normalization", {"muon_row_normalize": False}, "#1855"),
    Element("Polar Express Newton-Schulz", {"muon_ns_coeffs": "classic"}, "#1855"),
    Element("all of frontier's training settings (seed's optimizer and schedule instead)", dict(
        warmdown_frac=0.0, min_lr=0.0, train_seq_schedule="", seq_change_warmup_steps=0, muon_row_normalize=False,
        muon_ns_coeffs="classic", matrix_lr=0.025, scalar_lr=0.025, tied_embed_lr=0.035, muon_momentum=0.95,
        muon_momentum_warmup_start=0.85, muon_wd=0.04, adam_beta2=0.95, embed_wd=-1.0, embed_beta2=-1.0,
        scalar_wd=-1.0, scalar_beta2=-1.0), "#1855, #2014"),
    Element("n-gram tilt", {"ngram_tilt_enabled": False}, "#2135", stage="eval"),
    Element("AsymLogit", {"asym_logit_rescale": False}, "#1945", stage="eval"),
    Element("phased LoRA TTT (seed's TTT instead)", {"eval_mode": "ttt"}, "#1855", stage="eval",
            only_if={"eval_mode": "lora_ttt"}),
)


def log(msg: str) -> None:
    print(f"[ablation {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def slug(label: str) -> str:
    return "".join(ch for ch in label if ch.isalnum())


def applies(cfg, el: Element) -> bool:
    """The element exists in this checkout's config and is on in the frontier config."""
    flat = cfg.flat()
    if any(k not in flat for k in el.off) or any(flat.get(k) != v for k, v in el.only_if.items()):
        return False
    return any(flat[k] != v for k, v in el.off.items())


def configs(args: argparse.Namespace, data: Path, tokenizer: Path) -> dict[str, Any]:
    """baseline and seed at the bench shape; frontier as its own small preset; all on the same data."""
    common = dict(data_path=str(data), tokenizer_path=str(tokenizer), val_loss_every=0, device="cpu",
                  max_wallclock_seconds=0, train_log_every=max(1, args.steps // 5), seed=args.seed)
    out = {stack: B.at_shape(stack, args.shape, args.steps) for stack in ("baseline", "seed")}
    out["frontier"] = B.at_shape(args.frontier, None, args.steps)
    # a cut val split: the seed's TTT chunk shrinks so it still adapts more than once
    for name, cfg in out.items():
        chunk = min(cfg.eval.ttt_chunk_tokens, max(cfg.eval_seq_len, args.val_tokens // 4))
        out[name] = cfg.with_overrides(**common, ttt_chunk_tokens=chunk - chunk % cfg.eval_seq_len)
    return out


def train_only(cfg, run_dir: Path) -> dict[str, Any]:
    from pgolf.evaluate import evaluate
    from pgolf.train import train

    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    tr = train(cfg, run_dir)
    seconds = time.perf_counter() - t0
    pre = evaluate(cfg, run_dir, mode="rows", checkpoint=run_dir / "checkpoint" / "model.pt",
                   summary_name="eval_prequant.json")
    return {"steps": tr.steps, "train_s": round(seconds, 1), "tokens": tr.tokens_seen, "prequant": pre.val_bpb,
            "params": param_count(cfg)}


def param_count(cfg) -> int:
    import torch

    from pgolf.model import GPT

    with torch.device("meta"):
        return GPT(cfg.model).num_params()


def full_stack(cfg, run_dir: Path) -> dict[str, Any]:
    from pgolf.evaluate import evaluate
    from pgolf.quantize import calibrate, quantize

    row = train_only(cfg, run_dir)
    if cfg.quant.quant_method == "gptq":
        calibrate(cfg, run_dir)
    q = quantize(cfg, run_dir)
    post = evaluate(cfg, run_dir, mode="rows", summary_name="eval_postquant.json")
    final = evaluate(cfg, run_dir, mode=cfg.eval.eval_mode, summary_name="eval_summary.json")
    row.update(postquant=post.val_bpb, final=final.val_bpb, final_mode=cfg.eval.eval_mode,
               eval_s=round(final.eval_time_s, 1), model_bytes=q.model_bytes)
    return row


def eval_without(cfg, run_dir: Path, el: Element) -> dict[str, Any]:
    from pgolf.evaluate import evaluate

    c = cfg.with_overrides(**el.off)
    name = f"eval_without_{slug(el.label)}.json"
    r = evaluate(c, run_dir, mode=c.eval.eval_mode, summary_name=name)
    return {"final": r.val_bpb, "final_mode": c.eval.eval_mode, "eval_s": round(r.eval_time_s, 1)}


def caseops_row(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from cpu import prepare_data

    caseops = REPO / "data" / "offline-caseops"
    data = prepare_data(caseops, work, args.val_tokens, caseops=True)
    cfg = B.at_shape(args.frontier, None, args.steps).with_overrides(
        data_path=str(data), tokenizer_path=str(caseops / "tokenizer.model"), val_loss_every=0, device="cpu",
        max_wallclock_seconds=0, seed=args.seed)
    return full_stack(cfg, work / "frontier-caseops")


def markdown(rep: dict[str, Any]) -> str:
    L = [f"# Frontier ablation, {rep['utc']}", "",
         f"Shape `{rep['shape']}` (frontier: `{rep['frontier_preset']}`), {rep['steps']} steps per run, seed "
         f"{rep['seed']}, val cut to {rep['val_tokens']} tokens, {rep['threads']} threads; wall {rep['wall_s']:.0f} s. "
         "Same token stream and seed for every row.", "",
         "## Stacks", "", "| stack | params | prequant | postquant | final (mode) | model bytes | train s |",
         "|---|---|---|---|---|---|---|"]
    for name, r in rep["stacks"].items():
        L.append(f"| `{name}` | {r['params']:,} | {r['prequant']:.4f} | {r['postquant']:.4f} | "
                 f"{r['final']:.4f} ({r['final_mode']}) | {r['model_bytes']:,} | {r['train_s']} |")
    L += ["", "## One element off (train elements: prequant bpb; eval elements: final bpb)", "",
          "| element off | source | bpb | Δ vs frontier | helps here? |", "|---|---|---|---|---|"]
    for r in rep["elements"]:
        L.append(f"| {r['element']} | {r['source']} | {r['bpb']:.4f} | {r['delta']:+.4f} | {helps(r['delta'])} |")
    if rep.get("diagnostics"):
        L += ["", "## Diagnostics (same data, steps and seed; prequant bpb)", "", "| run | what | bpb |", "|---|---|---|"]
        L += [f"| {d['name']} | {d['what']} | {d['prequant']:.4f} |" for d in rep["diagnostics"]]
    if rep.get("caseops"):
        c = rep["caseops"]
        L += ["", f"Frontier on CaseOps text (sidecar bytes): prequant {c['prequant']:.4f}, final {c['final']:.4f} "
                  f"({c['final_mode']}), model {c['model_bytes']:,} B."]
    return "\n".join(L) + "\n"


NOISE_BPB = 0.001  # deltas smaller than this are not read as an effect (other seeds move rows this much)


def helps(delta: float) -> str:
    if abs(delta) < NOISE_BPB:
        return "no measurable effect"
    return "yes" if delta > 0 else "no (it hurts here)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/ablation.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="debug shapes, 6 steps: a smoke run")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 100)")
    p.add_argument("--val-tokens", type=int, default=None, help="cut the val split to N tokens (default 32768)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--only", default="", help="comma-separated element labels (substring match); default all")
    p.add_argument("--no-caseops", action="store_true", help="skip the CaseOps row")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--render", type=Path, default=None, metavar="JSON", help="only rewrite the markdown of a report")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        return 0
    import torch

    from cpu import prepare_data  # the cut offline corpus, shared with `make bench`

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    stamp = B.utc_stamp()
    work = args.out_dir / f"frontier-{stamp}-runs"
    offline = REPO / "data" / "offline"
    data = prepare_data(offline, work, args.val_tokens)
    cfgs = configs(args, data, offline / "tokenizer.model")
    rep: dict[str, Any] = {"utc": stamp, "shape": args.shape, "frontier_preset": args.frontier, "steps": args.steps,
                           "seed": args.seed, "val_tokens": args.val_tokens, "threads": args.threads,
                           "stacks": {}, "elements": []}
    for name, cfg in cfgs.items():
        log(f"stack {name}")
        rep["stacks"][name] = full_stack(cfg, work / name)
    frontier, ref = cfgs["frontier"], rep["stacks"]["frontier"]
    wanted = [s.strip().lower() for s in args.only.split(",") if s.strip()]
    for el in ELEMENTS:
        if wanted and not any(w in el.label.lower() for w in wanted):
            continue
        if not applies(frontier, el):
            log(f"skip {el.label}: not on in {args.frontier}")
            continue
        log(f"without {el.label}")
        if el.stage == "train":
            r = train_only(frontier.with_overrides(**el.off), work / f"without-{slug(el.label)}")
            bpb, delta = r["prequant"], r["prequant"] - ref["prequant"]
        else:
            r = eval_without(frontier, work / "frontier", el)
            bpb, delta = r["final"], r["final"] - ref["final"]
        rep["elements"].append({"element": el.label, "source": el.source, "stage": el.stage, "bpb": bpb,
                                "delta": delta, **r})
    if not args.no_caseops:
        log("frontier on CaseOps text")
        rep["caseops"] = caseops_row(args, work)
    rep["wall_s"] = time.perf_counter() - t0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"frontier-{stamp}.json"
    path.write_text(json.dumps(rep, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(rep))
    log(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
