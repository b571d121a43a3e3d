"""Quantize one checkpoint several ways and score each: bytes and val_bpb side by side.

Scoring is deliberately independent of `pgolf.evaluate`: non-overlapping rows of EVAL_SEQ_LEN
tokens over the val stream (the tail that does not fill a row is dropped), NLL from the model's
`per_token_nll`, bytes from `pgolf.data.bpb`. It is a like-for-like yardstick for the quantization
gap, not the submission score (no sliding window, no TTT).

Besides the baseline's int8 and the configured quantizer, each element of the frontier quantizer
(PRs #1855, #1908, #2135: SDClip per role, int7 tok_emb, AWQ-lite, LQER, int8 gates, per-group
compression, similarity sort) gets its own row: the configured quantizer with that one element switched on (`+`), or
off when the configuration already has it (`-`), then all of them at once. Every row's bytes are
the artifact file it wrote.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

# every frontier-quantizer element off: the baseline row is the baseline's quantizer whatever the config
_OFF = dict(row_clip="search", mlp_clip_sigmas=0.0, attn_clip_sigmas=0.0, embed_clip_sigmas=0.0, embed_bits=8,
            embed_clip="percentile", embed_gptq=False, int8_row_tensors="", lowrank_rank=0, lowrank_tensors=0,
            lowrank_packing="fp16", awq_lite_enabled=False, compress_groups=False, sort_rows="")

# name -> QuantConfig overrides ({} = the run's own quant config)
METHODS: dict[str, dict] = {
    "int8 rtn percentile + zlib (baseline)": {**_OFF, **dict(quant_method="rtn", matrix_bits=8, embed_bits=8,
                                                             row_clip="percentile", compressor="zlib", q_layout="int8",
                                                             prune_fraction=0.0)},
    "rtn clip-search (diag-H weighted), configured bits": dict(quant_method="rtn", row_clip="search"),
    "configured (QUANT_* settings)": {},
}


@dataclass(frozen=True)
class Element:
    """One element of the frontier quantizer (PRs #1855, #1908, #2135) as an on/off switch."""

    label: str
    on: dict
    off: dict

    def is_on(self, q) -> bool:
        return all(getattr(q, k) == v for k, v in self.on.items())


# each becomes a compare row: the configured quantizer with the element switched on (or off, when on)
ELEMENTS: tuple[Element, ...] = (
    Element("SDClip per role (MLP 11.5, attention 13.0, other 12.85)",
            dict(row_clip="sdclip", sdclip_k=12.85, mlp_clip_sigmas=11.5, attn_clip_sigmas=13.0),
            dict(row_clip="search", mlp_clip_sigmas=0.0, attn_clip_sigmas=0.0)),
    Element("int7 tok_emb, SDClip 14.0, GPTQ on the head input",
            dict(embed_bits=7, embed_clip="sdclip", embed_clip_sigmas=14.0, embed_gptq=True),
            dict(embed_bits=8, embed_clip="percentile", embed_clip_sigmas=0.0, embed_gptq=False)),
    Element("AWQ-lite: the most salient 64-column group at int8",
            dict(awq_lite_enabled=True, awq_lite_bits=8, awq_lite_group_top_k=1, awq_lite_group_size=64),
            dict(awq_lite_enabled=False)),
    Element("LQER rank 4 on the 3 worst tensors, INT2/INT4 factors",
            dict(lowrank_rank=4, lowrank_tensors=3, lowrank_packing="asym", lowrank_group=64),
            dict(lowrank_rank=0, lowrank_tensors=0, lowrank_packing="fp16")),
    Element("gate matrices int8 per row (INT8_ROW_TENSORS=*attn.gate*)", dict(int8_row_tensors="*attn.gate*"),
            dict(int8_row_tensors="")),
    Element("per-group compression", dict(compress_groups=True), dict(compress_groups=False)),
    Element("similarity sort of tok_emb, attn.c_q, mlp.fc rows (per-group layout)",
            dict(compress_groups=True, sort_rows="tok_emb,attn.c_q,mlp.fc"), dict(sort_rows="")),
)
ALL_ELEMENTS = "all frontier quantizer elements"


def frontier_overrides(**over) -> dict:
    """QuantConfig overrides switching every element on (then `over`), e.g. for `dataclasses.replace`."""
    return {**{k: v for el in ELEMENTS for k, v in el.on.items()}, **over}


def element_methods(q) -> dict[str, dict]:
    """'+ label' (switched on) or '- label' (switched off, when the config has it) per element, then all on."""
    out = {}
    for el in ELEMENTS:
        on = el.is_on(q)
        out[f"{'-' if on else '+'} {el.label}"] = el.off if on else el.on
    out[ALL_ELEMENTS] = frontier_overrides()
    return out


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


def compare_methods(cfg, run_dir: Path, max_val_tokens: int | None = None, code_bytes: int | None = None,
                    elements: bool = True) -> list[dict]:
    """One row per method: bytes and val_bpb of the same checkpoint (fp32 first), gap to fp32; with
    `elements`, then one row per frontier-quantizer element (`element_methods`) and all of them."""
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
        # (the head-input Hessian too, for the tok_emb element; configs without EMBED_GPTQ ignore it)
        hess = Path(tmp) / "hessians.pt"
        calibrate_checkpoint(replace(cfg, quant=replace(cfg.quant, embed_gptq=True)), ckpt, hess)
        methods = {**METHODS, **(element_methods(cfg.quant) if elements else {})}
        for name, over in methods.items():
            c = replace(cfg, quant=replace(cfg.quant, **over, size_cap_bytes=10**12))
            art, rep = Path(tmp) / "artifact.pgz", Path(tmp) / "quant_report.json"
            res = quantize_checkpoint(c, ckpt, art, rep, hessians_path=hess, code_bytes=code_bytes)
            bpb = rows_bpb(model, cfg, load_artifact(art), max_val_tokens)
            label = name if name[:1] in "+-" or name == ALL_ELEMENTS else (
                f"{name}: {c.quant.quant_method} int{c.quant.matrix_bits}/emb{c.quant.embed_bits}")
            report = json.loads(rep.read_text())
            out.append({"method": label, "bits": c.quant.matrix_bits, "compressor": f"{res.layout}+{res.compressor}",
                        "model_bytes": res.model_bytes, "total_bytes": res.total_bytes, "val_bpb": bpb,
                        "gap_bpb": bpb - base, "over_cap": res.total_bytes > cfg.quant.size_cap_bytes,
                        "fallbacks": report["fallbacks"], "file_bytes": art.stat().st_size})
    return out


def with_deltas(rows: list[dict]) -> list[dict]:
    """The rows with `d_bytes` and `d_bpb` against the configured row (None where there is none)."""
    ref = next((r for r in rows if r["method"].startswith("configured")), None)
    out = []
    for r in rows:
        d = dict(r)
        known = ref is not None and r["model_bytes"] is not None and ref["model_bytes"] is not None
        d["d_bytes"] = r["model_bytes"] - ref["model_bytes"] if known else None
        d["d_bpb"] = r["val_bpb"] - ref["val_bpb"] if known else None
        out.append(d)
    return out


def format_compare(rows: list[dict]) -> str:
    head = ("method", "compressor", "model_bytes", "total_bytes", "val_bpb", "gap_bpb", "vs configured")
    cells = [(r["method"], r["compressor"], "-" if r["model_bytes"] is None else f"{r['model_bytes']:,}",
              "-" if r["total_bytes"] is None else f"{r['total_bytes']:,}", f"{r['val_bpb']:.4f}",
              f"{r['gap_bpb']:+.4f}",
              "-" if r["d_bytes"] is None else f"{r['d_bytes']:+,} B {r['d_bpb']:+.4f} bpb")
             for r in with_deltas(rows)]
    w = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(x) for h, x in zip(head, w))]
    lines += ["  ".join(c.ljust(x) if i < 2 else c.rjust(x) for i, (c, x) in enumerate(zip(cell, w))) for cell in cells]
    return "\n".join(lines)
