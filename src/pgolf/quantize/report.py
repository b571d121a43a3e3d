"""Size accounting and the per-tensor report (`quant_report.json`, the CLI table).

Total = compressed model bytes (the artifact file size) + code bytes, against the decimal 16,000,000 B
cap (technique-spec §4.3). Code bytes are those of the generated train_gpt.py (`code_facts` below):
the running file itself when a run executes one, else the file `pgolf submission build` would ship for
the run's config; a caller may pass its own figure. `code_bytes_source` says which, in words.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pgolf.runinfo import bundled_code_facts

CODE_SOURCE_GIVEN = "given by the caller (--code-bytes)"


def code_facts(cfg: Any) -> dict[str, Any]:
    """What this run counts as code bytes, and why (quant_report.json, environment.json).

    From a generated train_gpt.py (what `pgolf launch` runs): that file's own bytes and sha256, the
    file a submission ships. From the package: `pgolf.submission.bundle.package_code_facts` (the
    file a submission would ship). The bundler is imported only on that path: the single file does
    not embed it (its bytes would count), and a run from the single file never reaches it.
    """
    facts = bundled_code_facts()
    if facts:
        return facts
    from pgolf.submission.bundle import package_code_facts

    return package_code_facts(cfg)


@dataclass
class TensorRow:
    name: str
    shape: list[int]
    kind: str  # quant | fp16 | raw
    method: str  # gptq | rtn-search | rtn-sdclip | rtn-percentile | embed-percentile | embed-sdclip | int8-row | fp16 | raw
    bits: int  # 16 for fp16 passthrough, 0 for raw
    payload_bytes: int  # bytes before compression (values + scales + AWQ groups + low-rank factors)
    rel_err: float  # ||W - W_hat||_F / ||W||_F
    out_err: float | None = None  # sqrt(tr(E H E^T) / tr(W H W^T)) when a Hessian is known
    pruned: float = 0.0  # fraction of exact zeros forced by pruning
    lowrank: int = 0  # rank of the stored correction
    note: str = ""


def _fmt_err(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2e}" if x and (x < 1e-3) else f"{x:.4f}"


def format_table(rows: list[TensorRow]) -> str:
    """Fixed-width per-tensor table: name, shape, method, bits, bytes, relative errors, notes."""
    head = ("tensor", "shape", "method", "bits", "bytes", "rel_err", "out_err", "note")
    lines = [
        (r.name, "x".join(map(str, r.shape)) or "scalar", r.method, str(r.bits), f"{r.payload_bytes:,}",
         _fmt_err(r.rel_err), _fmt_err(r.out_err),
         "; ".join(x for x in (r.note, f"pruned {r.pruned:.1%}" if r.pruned else "",
                               f"low-rank {r.lowrank}" if r.lowrank else "") if x))
        for r in rows
    ]
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    for l in lines:
        out.append("  ".join(c.rjust(w) if i in (3, 4, 5, 6) else c.ljust(w)
                             for i, (c, w) in enumerate(zip(l, widths))).rstrip())
    return "\n".join(out)


def summary_lines(report: dict) -> list[str]:
    """Upstream-compatible size lines (`Serialized model ...`, `Total submission size ...`)."""
    tag = f"int{report['quant']['matrix_bits']}+{report['compressor']}"
    return [
        f"Serialized model {tag}: {report['model_bytes']} bytes",
        f"Code size: {report['code_bytes']} bytes ({report['code_bytes_source']})",
        f"Total submission size {tag}: {report['total_bytes']} bytes "
        f"(cap {report['size_cap_bytes']}, headroom {report['headroom_bytes']})",
    ]


def size_lines(report_path: str | Path) -> list[str]:
    """`summary_lines` of a written quant_report.json."""
    return summary_lines(json.loads(Path(report_path).read_text(encoding="utf-8")))


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def report_json(report: dict, rows: list[TensorRow]) -> str:
    data = dict(report)
    data["tensors"] = [asdict(r) for r in rows]
    return json.dumps(_clean(data), indent=2, sort_keys=True) + "\n"
