"""The quantize stage: checkpoint/model.pt (+ hessians.pt) -> artifact.pgz + quant_report.json.

Routing of state-dict tensors (technique-spec §4.1/§4.2):
  * non-float                                   -> raw bytes, original dtype;
  * float 2-D matching INT8_ROW_TENSORS         -> int8 per row, scale rowmax/127 (#1855's gates);
  * float with <= PASSTHROUGH_MAX_NUMEL entries,
    or fewer than 2 dims                        -> fp16 passthrough;
  * nn.Linear weights (the "matrices")          -> MATRIX_BITS, GPTQ with the calibration Hessian
                                                   (QUANT_METHOD=gptq) or round-to-nearest (rtn),
                                                   row scales by ROW_CLIP (SDClip sigmas per role:
                                                   MLP_/ATTN_CLIP_SIGMAS, else SDCLIP_K); optional
                                                   pruning and AWQ-lite groups;
  * the tied embedding with EMBED_GPTQ and a
    Hessian (the head's input)                  -> EMBED_BITS through GPTQ, EMBED_CLIP rule;
  * other large 2-D tensors (tied embedding,
    BigramHash table)                           -> EMBED_BITS per row, RTN, percentile clip or
                                                   SDClip (EMBED_CLIP, EMBED_CLIP_SIGMAS).
Then the LOWRANK_TENSORS GPTQ/matrix tensors with the largest error get a rank-LOWRANK_RANK
correction (pgolf.quantize.lowrank). GPTQ without a Hessian for a tensor falls back to clip-search
RTN for that tensor, and the report says so (row note + "fallbacks").
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pgolf.errors import ArtifactError, BudgetError
from pgolf.quantize import rows as R
from pgolf.fileio import atomic_write_bytes
from pgolf.quantize import awq, lowrank
from pgolf.quantize.artifact import Entry, choose, dequantize_entry
from pgolf.quantize.gptq import gptq_quantize, output_error
from pgolf.quantize.groups import parse_roles
from pgolf.quantize.meta import describe
from pgolf.quantize.report import CODE_SOURCE_GIVEN, TensorRow, code_facts, report_json, summary_lines

log = logging.getLogger(__name__)


@dataclass
class QuantResult:
    model_bytes: int
    code_bytes: int
    total_bytes: int
    compressor: str
    layout: str
    rows: list[TensorRow]
    artifact_path: Path
    report_path: Path
    size_cap_bytes: int
    seconds: float
    compress_seconds: float = 0.0  # of `seconds`: trying the compressors (artifact.choose)
    # `entries` (the stored tensors, for dequantize_in_memory) is set as a plain attribute, not a
    # field, so that dataclasses.asdict(result) stays small

    @property
    def over_cap(self) -> int:
        return max(0, self.total_bytes - self.size_cap_bytes)


def dequantize_in_memory(entries: list[Entry]) -> dict[str, torch.Tensor]:
    """The state dict the artifact will load as (same function as the loader: identical tensors)."""
    return {e.name: dequantize_entry(e) for e in sorted(entries, key=lambda e: e.name)}


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _rel(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    den = float(w.float().norm())
    return float((w.float() - w_hat.float()).norm()) / den if den > 0 else 0.0


def clip_sigmas(name: str, qcfg) -> float:
    """SDClip k of a tensor by role (#1855): tied embedding, MLP, attention, else SDCLIP_K."""
    dotted = f".{name}"
    if name.startswith("tok_emb."):
        k = qcfg.embed_clip_sigmas
    elif ".mlp." in dotted:
        k = qcfg.mlp_clip_sigmas
    elif ".attn." in dotted:
        k = qcfg.attn_clip_sigmas
    else:
        k = 0.0
    return k or qcfg.sdclip_k


def _quant_gptq(name, w2, qcfg, h, device, fallbacks, bits, rule, awq_starts):
    """(parts, method, note, pruned) for one tensor on the GPTQ path (2-D float32 on device)."""
    keep = R.magnitude_mask(w2, qcfg.prune_fraction)
    wk = w2 if keep is None else w2 * keep
    note = ""
    use_gptq = qcfg.quant_method == "gptq" and h is not None
    if qcfg.quant_method == "gptq" and h is None:
        rule = "search"
        note = "no Hessian: clip-search RTN"
        fallbacks.append(f"{name}: no Hessian, quantized with clip-search RTN")
    col_weight = None if h is None else h.diagonal().to(device)
    k = clip_sigmas(name, qcfg)
    scale = R.row_scales(wk, bits, rule, sdclip_k=k, percentile=qcfg.embed_clip_percentile, col_weight=col_weight)
    hi = None
    if use_gptq and awq_starts:
        hi = awq.column_mask(w2.shape[1], awq_starts, qcfg.awq_lite_group_size)
        hi_scale = R.row_scales(wk, qcfg.awq_lite_bits, rule, sdclip_k=k, percentile=qcfg.embed_clip_percentile,
                                col_weight=col_weight)
    if use_gptq:
        try:
            out = gptq_quantize(wk, h.to(device), scale, bits, block_size=qcfg.gptq_block_size,
                                damp=qcfg.gptq_damp, act_order=qcfg.gptq_act_order, keep=keep,
                                hi_cols=hi, hi_scale16=None if hi is None else hi_scale, hi_bits=qcfg.awq_lite_bits)
        except torch.linalg.LinAlgError as exc:
            raise ArtifactError(f"GPTQ failed on {name}: {exc}; raise GPTQ_DAMP or use QUANT_METHOD=rtn") from None
        q = out.q
        method = "gptq"
        extra = []
        if out.dead_columns:
            extra.append(f"{out.dead_columns} dead columns")
        if out.damp != qcfg.gptq_damp:
            extra.append(f"damp raised to {out.damp:g}")
        note = "; ".join(extra)
    else:
        q = R.rtn(wk, scale, bits)
        if keep is not None:
            q = q * keep.to(torch.int8)
        method = f"rtn-{rule}"
    pruned = 0.0 if keep is None else float((~keep).float().mean())
    parts = {"q": q.cpu(), "scale": scale.cpu()}
    if hi is not None:
        hi = hi.to(q.device)
        parts = {"q": q[:, ~hi].cpu().contiguous(), "scale": scale.cpu(),
                 "hi_start": torch.tensor(awq_starts, dtype=torch.int32), "hi_q": q[:, hi].cpu().contiguous(),
                 "hi_scale": hi_scale.cpu()}
        note = "; ".join(x for x in (note, f"AWQ-lite: {int(hi.sum())} columns at int{qcfg.awq_lite_bits}") if x)
    return parts, method, note, pruned


def _int8_rows(w2: torch.Tensor) -> dict[str, torch.Tensor]:
    """int8 per row with scale rowmax/127 (#1855's gate tensors)."""
    scale = R.to_fp16_scale(w2.float().abs().amax(dim=1) / 127.0)
    return {"q": R.rtn(w2, scale, 8).cpu(), "scale": scale.cpu()}


def _gptq_bound(name: str, qcfg, matrix_keys: set[str], hessians: dict) -> bool:
    """Whether a large float tensor takes the GPTQ path (matrices; the tied embedding with EMBED_GPTQ)."""
    return name in matrix_keys or (qcfg.embed_gptq and name.startswith("tok_emb.") and name in hessians)


def quantize_state_dict(
    state: dict[str, torch.Tensor],
    qcfg,
    matrix_keys: set[str],
    hessians: dict[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    route_shapes: dict[str, tuple[int, ...]] | None = None,
) -> tuple[list[Entry], list[TensorRow], list[str]]:
    """Entries for the artifact, one report row per tensor, and the fallbacks taken.

    `route_shapes` (the size estimator's): route each tensor by this shape instead of its own, so that
    row-reduced stand-ins take the path of the full-size tensor."""
    hessians = hessians or {}
    device = torch.device(device)
    entries: list[Entry] = []
    rows: dict[str, TensorRow] = {}
    fallbacks: list[str] = []
    int8_patterns = parse_roles(qcfg.int8_row_tensors)
    shapes = {n: tuple((route_shapes or {}).get(n, t.shape)) for n, t in state.items()}
    large = {n for n, t in state.items() if t.is_floating_point() and len(shapes[n]) >= 2
             and math.prod(shapes[n]) > qcfg.passthrough_max_numel
             and not any(fnmatch.fnmatchcase(n, p) for p in int8_patterns)}
    gptq_names = {n for n in large if _gptq_bound(n, qcfg, matrix_keys, hessians)}
    awq_starts: dict[str, list[int]] = {}
    if qcfg.awq_lite_enabled and qcfg.quant_method == "gptq":
        cands = {}
        for n in sorted(gptq_names):
            bits = qcfg.matrix_bits if n in matrix_keys else qcfg.embed_bits
            if n in hessians and bits < qcfg.awq_lite_bits:
                cands[n] = (state[n].detach().float().reshape(state[n].shape[0], -1), hessians[n])
        awq_starts = awq.select_groups(cands, qcfg.awq_lite_group_size, qcfg.awq_lite_group_top_k)
    for name in sorted(state):
        t = state[name].detach().cpu()
        shape = tuple(t.shape)
        if not t.is_floating_point():
            e = Entry(name, "raw", shape, _dtype_name(t), {"data": t.contiguous()})
            entries.append(e)
            rows[name] = TensorRow(name, list(shape), "raw", "raw", 0, e.payload_bytes(), 0.0)
            continue
        if t.ndim >= 2 and any(fnmatch.fnmatchcase(name, p) for p in int8_patterns):
            e = Entry(name, "quant", shape, _dtype_name(t), _int8_rows(t.float().reshape(shape[0], -1)), bits=8)
            entries.append(e)
            rows[name] = TensorRow(name, list(shape), "quant", "int8-row", 8, 0, 0.0)
            continue
        if name not in large:
            half = t.half()
            if not torch.isfinite(half).all() and torch.isfinite(t).all():
                raise ArtifactError(f"{name} has values beyond fp16 range (max |x| {float(t.abs().max()):.3g}); it cannot be passed through as fp16")
            e = Entry(name, "fp16", shape, _dtype_name(t), {"data": half.contiguous()})
            entries.append(e)
            rows[name] = TensorRow(name, list(shape), "fp16", "fp16", 16, e.payload_bytes(),
                                   _rel(t, dequantize_entry(e)))
            continue
        w2 = t.float().reshape(shape[0], -1).to(device)
        h = hessians.get(name)
        if name in gptq_names:
            bits = qcfg.matrix_bits if name in matrix_keys else qcfg.embed_bits
            rule = qcfg.row_clip if name in matrix_keys else _embed_rule(qcfg)
            parts, method, note, pruned = _quant_gptq(name, w2, qcfg, h, device, fallbacks, bits, rule,
                                                      awq_starts.get(name))
        else:
            bits = qcfg.embed_bits
            if qcfg.embed_clip == "sdclip":
                scale = R.sdclip_scales(w2, bits, clip_sigmas(name, qcfg))
                method = "embed-sdclip"
            else:
                scale = R.percentile_scales(w2, bits, qcfg.embed_clip_percentile)
                method = "embed-percentile"
            parts = {"q": R.rtn(w2, scale, bits).cpu(), "scale": scale.cpu()}
            note, pruned = "", 0.0
            if qcfg.embed_gptq and name.startswith("tok_emb."):
                note = "no head-input Hessian: RTN"
                fallbacks.append(f"{name}: no Hessian of the head's input (the model has no `final_norm` module), RTN")
        e = Entry(name, "quant", shape, _dtype_name(t), parts, bits=bits)
        entries.append(e)
        rows[name] = TensorRow(name, list(shape), "quant", method, bits, 0, 0.0, note=note, pruned=pruned)

    if qcfg.lowrank_rank > 0 and qcfg.lowrank_tensors > 0:
        _add_lowrank(entries, state, gptq_names, qcfg, rows, device)

    for e in entries:  # errors and sizes of the final (stored) tensors
        if e.kind != "quant":
            continue
        w = state[e.name].detach().float().cpu()
        w_hat = dequantize_entry(e)
        r = rows[e.name]
        r.payload_bytes = e.payload_bytes()
        r.rel_err = _rel(w, w_hat)
        h = hessians.get(e.name)
        if h is not None:
            r.out_err = output_error(w.reshape(w.shape[0], -1), w_hat.reshape(w.shape[0], -1), h) ** 0.5
    return entries, [rows[e.name] for e in entries], fallbacks


def _embed_rule(qcfg) -> str:
    return "sdclip" if qcfg.embed_clip == "sdclip" else "percentile"


def _add_lowrank(entries, state, candidates, qcfg, rows, device) -> None:
    """Rank-k correction of E = W - W_hat on the `lowrank_tensors` GPTQ-path tensors with the largest
    ||E||_F (pgolf.quantize.lowrank; fp16 or LQER's asymmetric INT2/INT4 factors)."""
    errs = []
    for e in entries:
        if e.kind == "quant" and e.name in candidates:
            w = state[e.name].detach().float().reshape(e.shape[0], -1)
            errs.append((float((w - dequantize_entry(e).reshape(w.shape)).norm()), e.name, e))
    errs.sort(key=lambda x: (-x[0], x[1]))
    for _, name, e in errs[: qcfg.lowrank_tensors]:
        w = state[name].detach().float().reshape(e.shape[0], -1).to(device)
        err = w - dequantize_entry(e).reshape(w.shape).to(device)
        parts = lowrank.correction_parts(err, qcfg.lowrank_rank, qcfg.lowrank_packing, qcfg.lowrank_group)
        e.parts.update(parts)
        rows[name].lowrank = int(parts["lr_a"].shape[1])
        if qcfg.lowrank_packing == "asym":
            rows[name].note = "; ".join(x for x in (rows[name].note, "LQER INT2/INT4") if x)


def _load_hessians(path: Path | None) -> tuple[dict[str, torch.Tensor], dict | None]:
    if path is None or not path.is_file():
        return {}, None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return dict(data["hessians"]), dict(data.get("meta", {}))
    except Exception as exc:
        raise ArtifactError(f"{path} is unreadable ({type(exc).__name__}); rerun calibration or delete it") from None


def matrix_keys_of(cfg) -> set[str]:
    """State-dict keys of every nn.Linear weight of GPT(cfg.model) (the GPTQ/matrix path)."""
    from torch import nn

    from pgolf.model import GPT

    with torch.device("meta"):
        model = GPT(cfg.model)
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def quantize_checkpoint(
    cfg,
    checkpoint: Path,
    artifact_path: Path,
    report_path: Path,
    hessians_path: Path | None = None,
    code_bytes: int | None = None,
    matrix_keys: set[str] | None = None,
    check_cap: bool = True,
) -> QuantResult:
    """Quantize one checkpoint file; write the artifact and the report, then enforce the cap
    (BudgetError; with check_cap=False the caller checks `result.over_cap` itself)."""
    t0 = time.perf_counter()
    q = cfg.quant
    if not Path(checkpoint).is_file():
        raise ArtifactError(f"checkpoint {checkpoint} not found; train first (`pgolf train`) or pass a run folder")
    meta = describe(cfg)  # before any work: a missing tokenizer fails here, not after GPTQ
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if matrix_keys is None:
        matrix_keys = matrix_keys_of(cfg)
    hessians, hmeta = _load_hessians(hessians_path)
    from pgolf.quantize.calibrate import resolve_device

    device = resolve_device(cfg.train.device)
    entries, rows, fallbacks = quantize_state_dict(state, q, matrix_keys, hessians, device)
    blob, info = choose(entries, q.compressor, q.q_layout, meta=meta, groups=q.compress_groups,
                        sort_roles=parse_roles(q.sort_rows), sort_device=device)
    atomic_write_bytes(Path(artifact_path), blob)

    model_bytes = len(blob)
    if code_bytes is not None:
        code, code_source = int(code_bytes), CODE_SOURCE_GIVEN
    else:
        facts = code_facts(cfg)
        code, code_source = facts["code_bytes"], facts["code_bytes_source"]
    total = model_bytes + code
    seconds = time.perf_counter() - t0
    report = {
        "artifact": str(artifact_path),
        "checkpoint": str(checkpoint),
        "quant": asdict(q),
        "hessians": None if hmeta is None else {"path": str(hessians_path), "count": len(hessians), **hmeta},
        "compressor": info["compressor"],
        "layout": info["layout"],
        "body_bytes": info["body_bytes"],
        "candidates": info["candidates"],
        "skipped": info["skipped"],
        "compress_workers": info["workers"],
        "compress_seconds": info["compress_seconds"],
        **({"groups": info["groups"]} if "groups" in info else {}),
        "payload_bytes": sum(r.payload_bytes for r in rows),
        "model_bytes": model_bytes,
        "code_bytes": code,
        "code_bytes_source": code_source,
        "total_bytes": total,
        "size_cap_bytes": q.size_cap_bytes,
        "headroom_bytes": q.size_cap_bytes - total,
        "fallbacks": fallbacks,
        "seconds": round(seconds, 3),
    }
    atomic_write_bytes(Path(report_path), report_json(report, rows).encode())
    for line in summary_lines(report):
        log.info(line)
    log.info("compression: %s+%s of %d candidates (%d skipped by the probe), %.1f s with %d worker process(es)",
             info["layout"], info["compressor"], len(info["candidates"]) + len(info["skipped"]), len(info["skipped"]),
             info["compress_seconds"], info["workers"])
    for f in fallbacks:
        log.warning("quantize fallback: %s", f)
    result = QuantResult(model_bytes, code, total, info["compressor"], info["layout"], rows, Path(artifact_path),
                         Path(report_path), q.size_cap_bytes, seconds, info["compress_seconds"])
    result.entries = entries
    if check_cap and total > q.size_cap_bytes:
        raise BudgetError(
            f"{Path(artifact_path).name} + code is {total:,} B ({model_bytes:,} model + {code:,} code), "
            f"{total - q.size_cap_bytes:,} over the {q.size_cap_bytes:,} B cap; "
            f"lower MATRIX_BITS/EMBED_BITS (see {Path(report_path).name})"
        )
    return result


def quantize(cfg, run_dir: Path, code_bytes: int | None = None, check_cap: bool = True) -> QuantResult:
    """run_dir/checkpoint/model.pt (+ hessians.pt) -> run_dir/artifact.pgz + run_dir/quant_report.json.

    Over SIZE_CAP_BYTES: BudgetError after both files are written, unless check_cap=False (then the
    pipeline records `result.over_cap` in compliance.json itself)."""
    run_dir = Path(run_dir)
    return quantize_checkpoint(
        cfg,
        run_dir / "checkpoint" / "model.pt",
        run_dir / "artifact.pgz",
        run_dir / "quant_report.json",
        hessians_path=run_dir / "checkpoint" / "hessians.pt",
        code_bytes=code_bytes,
        check_cap=check_cap,
    )
