"""The quantize stage: checkpoint/model.pt (+ hessians.pt) -> artifact.pgz + quant_report.json.

Routing of state-dict tensors (technique-spec §4.1/§4.2):
  * non-float                                   -> raw bytes, original dtype;
  * float with <= PASSTHROUGH_MAX_NUMEL entries,
    or fewer than 2 dims                        -> fp16 passthrough;
  * nn.Linear weights (the "matrices")          -> MATRIX_BITS, GPTQ with the calibration Hessian
                                                   (QUANT_METHOD=gptq) or round-to-nearest (rtn),
                                                   row scales by ROW_CLIP; optional pruning and a
                                                   low-rank correction of the worst tensors;
  * other large 2-D tensors (tied embedding,
    BigramHash table)                           -> EMBED_BITS per row, percentile clip, RTN.
GPTQ without a Hessian for a tensor falls back to clip-search RTN for that tensor, and the report
says so (row note + "fallbacks").
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pgolf.errors import ArtifactError, BudgetError
from pgolf.quantize import rows as R
from pgolf.fileio import atomic_write_bytes
from pgolf.quantize.artifact import Entry, choose, dequantize_entry
from pgolf.quantize.gptq import gptq_quantize, output_error
from pgolf.quantize.meta import describe
from pgolf.quantize.report import CODE_SOURCE_GIVEN, TensorRow, report_json, summary_lines

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


def _quant_matrix(name, w2, qcfg, h, device, fallbacks):
    """(Entry parts, method, note, pruned fraction) for one nn.Linear weight (2-D float32 on device)."""
    bits = qcfg.matrix_bits
    keep = R.magnitude_mask(w2, qcfg.prune_fraction)
    wk = w2 if keep is None else w2 * keep
    note = ""
    use_gptq = qcfg.quant_method == "gptq" and h is not None
    rule = qcfg.row_clip
    if qcfg.quant_method == "gptq" and h is None:
        rule = "search"
        note = "no Hessian: clip-search RTN"
        fallbacks.append(f"{name}: no Hessian, quantized with clip-search RTN")
    col_weight = None if h is None else h.diagonal().to(device)
    scale = R.row_scales(wk, bits, rule, sdclip_k=qcfg.sdclip_k, percentile=qcfg.embed_clip_percentile,
                         col_weight=col_weight)
    if use_gptq:
        try:
            out = gptq_quantize(wk, h.to(device), scale, bits, block_size=qcfg.gptq_block_size,
                                damp=qcfg.gptq_damp, act_order=qcfg.gptq_act_order, keep=keep)
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
    return {"q": q.cpu(), "scale": scale.cpu()}, method, note, pruned


def quantize_state_dict(
    state: dict[str, torch.Tensor],
    qcfg,
    matrix_keys: set[str],
    hessians: dict[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[list[Entry], list[TensorRow], list[str]]:
    """Entries for the artifact, one report row per tensor, and the fallbacks taken."""
    hessians = hessians or {}
    device = torch.device(device)
    entries: list[Entry] = []
    rows: dict[str, TensorRow] = {}
    fallbacks: list[str] = []
    for name in sorted(state):
        t = state[name].detach().cpu()
        shape = tuple(t.shape)
        if not t.is_floating_point():
            e = Entry(name, "raw", shape, _dtype_name(t), {"data": t.contiguous()})
            entries.append(e)
            rows[name] = TensorRow(name, list(shape), "raw", "raw", 0, e.payload_bytes(), 0.0)
            continue
        if t.numel() <= qcfg.passthrough_max_numel or t.ndim < 2:
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
        if name in matrix_keys:
            parts, method, note, pruned = _quant_matrix(name, w2, qcfg, h, device, fallbacks)
            bits = qcfg.matrix_bits
        else:
            bits = qcfg.embed_bits
            scale = R.percentile_scales(w2, bits, qcfg.embed_clip_percentile)
            parts = {"q": R.rtn(w2, scale, bits).cpu(), "scale": scale.cpu()}
            method, note, pruned = "embed-percentile", "", 0.0
        e = Entry(name, "quant", shape, _dtype_name(t), parts, bits=bits)
        entries.append(e)
        rows[name] = TensorRow(name, list(shape), "quant", method, bits, 0, 0.0, note=note, pruned=pruned)

    if qcfg.lowrank_rank > 0 and qcfg.lowrank_tensors > 0:
        _add_lowrank(entries, state, matrix_keys, qcfg, rows, device)

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


def _add_lowrank(entries, state, matrix_keys, qcfg, rows, device) -> None:
    """Rank-k SVD of E = W - W_hat on the `lowrank_tensors` matrices with the largest ||E||_F (fp16 A, B)."""
    errs = []
    for e in entries:
        if e.kind == "quant" and e.name in matrix_keys:
            w = state[e.name].detach().float().reshape(e.shape[0], -1)
            errs.append((float((w - dequantize_entry(e).reshape(w.shape)).norm()), e.name, e))
    errs.sort(key=lambda x: (-x[0], x[1]))
    for _, name, e in errs[: qcfg.lowrank_tensors]:
        w = state[name].detach().float().reshape(e.shape[0], -1).to(device)
        err = w - dequantize_entry(e).reshape(w.shape).to(device)
        k = min(qcfg.lowrank_rank, *err.shape)
        u, s, vh = torch.linalg.svd(err, full_matrices=False)
        e.parts["lr_a"] = (u[:, :k] * s[:k]).half().cpu().contiguous()
        e.parts["lr_b"] = vh[:k].half().cpu().contiguous()
        rows[name].lowrank = k


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
    blob, info = choose(entries, q.compressor, q.q_layout, meta=meta)
    atomic_write_bytes(Path(artifact_path), blob)

    model_bytes = len(blob)
    if code_bytes is not None:
        code, code_source = int(code_bytes), CODE_SOURCE_GIVEN
    else:
        from pgolf.runinfo import code_facts

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
