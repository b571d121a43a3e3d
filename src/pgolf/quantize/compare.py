"""Quantize one checkpoint several ways and score each: bytes and val_bpb side by side.

Scoring is deliberately independent of `pgolf.evaluate`: non-overlapping rows of EVAL_SEQ_LEN
tokens over the val stream (the tail that does not fill a row is dropped), NLL from the model's
`per_token_nll`, bytes from `pgolf.data.bpb`. It is a like-for-like yardstick for the quantization
gap, not the submission score (no sliding window, no TTT).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

# name -> QuantConfig overrides ({} = the run's own quant config)
METHODS: dict[str, dict] = {
    "int8 rtn percentile + zlib (baseline)": dict(quant_method="rtn", matrix_bits=8, embed_bits=8,
                                                  row_clip="percentile", compressor="zlib", q_layout="int8",
                                                  prune_fraction=0.0, lowrank_rank=0, lowrank_tensors=0),
    "rtn clip-search (diag-H weighted), configured bits": dict(quant_method="rtn", row_clip="search"),
    "configured (QUANT_* settings)": {},
}


@torch.no_grad()
def rows_bpb(model, cfg, state: dict[str, torch.Tensor], max_tokens: int | None = None) -> float:
    """val_bpb of `state` loaded into `model`, scored in non-overlapping rows of EVAL_SEQ_LEN."""
    from pgolf.data.bpb import bits_per_byte, val_target_bytes
    from pgolf.data.loader import load_val_tokens

    model.load_state_dict(state, strict=True)
    model.eval()
    device = next(model.parameters()).device
    tokens = load_val_tokens(cfg.data.data_path, cfg.model.vocab_size)
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    seq = cfg.eval_seq_len
    n = (len(tokens) - 1) // seq
    tb = val_target_bytes(cfg.data.data_path, tokens, cfg.data.tokenizer_path)[: n * seq]
    x = torch.from_numpy(tokens[: n * seq].reshape(n, seq))
    y = torch.from_numpy(tokens[1 : n * seq + 1].reshape(n, seq))
    nll = 0.0
    step = max(1, cfg.eval.eval_batch_seqs)
    for i in range(0, n, step):
        xb, yb = x[i : i + step].to(device), y[i : i + step].to(device)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            nll += float(model.per_token_nll(xb, yb).double().sum())
    return bits_per_byte(nll, float(np.asarray(tb, dtype=np.int64).sum()))


def compare_methods(cfg, run_dir: Path, max_val_tokens: int | None = None, code_bytes: int | None = None) -> list[dict]:
    """One row per method: bytes and val_bpb of the same checkpoint (fp32 first), gap to fp32."""
    from pgolf.model import build_model
    from pgolf.quantize.artifact import load_artifact
    from pgolf.quantize.calibrate import calibrate_checkpoint, resolve_device
    from pgolf.quantize.quantizer import quantize_checkpoint

    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint" / "model.pt"
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model, device)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    base = rows_bpb(model, cfg, state, max_val_tokens)
    out = [{"method": "fp32 checkpoint (no quantization)", "bits": 32, "compressor": "-", "model_bytes": None,
            "total_bytes": None, "val_bpb": base, "gap_bpb": 0.0}]
    with tempfile.TemporaryDirectory(prefix="pgolf-compare-") as tmp:
        # fresh Hessians for exactly this config's targets (the run's hessians.pt may predate
        # a changed PASSTHROUGH_MAX_NUMEL); RTN variants use their diagonals to weight the clip search
        hess = Path(tmp) / "hessians.pt"
        calibrate_checkpoint(cfg, ckpt, hess)
        for name, over in METHODS.items():
            c = replace(cfg, quant=replace(cfg.quant, **over, size_cap_bytes=10**12))
            art = Path(tmp) / "artifact.pgz"
            res = quantize_checkpoint(c, ckpt, art, Path(tmp) / "quant_report.json",
                                      hessians_path=hess, code_bytes=code_bytes)
            bpb = rows_bpb(model, cfg, load_artifact(art), max_val_tokens)
            label = f"{name}: {c.quant.quant_method} int{c.quant.matrix_bits}/emb{c.quant.embed_bits}"
            out.append({"method": label, "bits": c.quant.matrix_bits, "compressor": f"{res.layout}+{res.compressor}",
                        "model_bytes": res.model_bytes, "total_bytes": res.total_bytes, "val_bpb": bpb,
                        "gap_bpb": bpb - base, "over_cap": res.total_bytes > cfg.quant.size_cap_bytes})
    return out


def format_compare(rows: list[dict]) -> str:
    head = ("method", "compressor", "model_bytes", "total_bytes", "val_bpb", "gap_bpb")
    cells = [(r["method"], r["compressor"], "-" if r["model_bytes"] is None else f"{r['model_bytes']:,}",
              "-" if r["total_bytes"] is None else f"{r['total_bytes']:,}", f"{r['val_bpb']:.4f}",
              f"{r['gap_bpb']:+.4f}") for r in rows]
    w = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(x) for h, x in zip(head, w))]
    lines += ["  ".join(c.ljust(x) if i < 2 else c.rjust(x) for i, (c, x) in enumerate(zip(cell, w))) for cell in cells]
    return "\n".join(lines)
