"""The artifact body: the tensor table and the payload encodings (`pgolf.quantize.artifact` frames it).

Body (before compression):

    0       4     header length N (u32)
    4       N     header: UTF-8 JSON, sorted keys, no spaces:
                  {"layout": "int8"|"packed", "meta": {...}, "tensors": [entry, ...]} with entries in
                  name order; meta (pgolf.quantize.meta) is what rebuilds and checks the model: its
                  config, how its run evaluated it, and the tokenizer's sha256 (format 2; new in 2),
                  entry = {"name", "kind": quant|fp16|raw, "shape", "dtype" (torch dtype of the
                  original tensor), "bits" (quant only), "parts": [part, ...]},
                  part  = {"role", "enc", "shape", "offset", "nbytes"} (offset from the payload start)
    4+N     ...   payload: every part's bytes, grouped by role in the order of ROLE_ORDER, so that
                  like bytes sit together for the entropy coder. Layout `grouped`: first every
                  part but q (and the row orders, role "perm"), then one segment per q role across
                  layers (`attn.c_q.weight` of every block, blocks in order; roles sorted by name).

Part encodings: "i8" int8 values; "i8t" int8 values stored column-major (the transpose); "u<b>"
the integers q + qmax (in [0, 2^b - 2]) bit-packed MSB-first into ceil(numel*b/8) bytes; "s<b>"
signed integers in [-2^(b-1), 2^(b-1) - 1] stored as q + 2^(b-1), packed the same way; "f16" IEEE
half; "np:<numpy dtype>" raw bytes (non-float tensors, row orders). A "perm" part (uint16, layout
`grouped`) is the row order q was stored in: stored[i] = q[perm[i]]; the reader undoes it.

A "quant" entry dequantizes, in float32, to q * scale[:, None], where
  * with AWQ-lite groups (parts hi_start, hi_q, hi_scale) q holds only the other columns; the
    hi_start[j] .. hi_start[j] + g - 1 columns (g = hi_q columns / len(hi_start)) are hi_q *
    hi_scale[:, None];
  * plus lr_a @ lr_b with a low-rank correction: fp16 factors, or (lr_a_scale present) LQER's
    asymmetric packing: A = lr_a * lr_a_scale (one scale), B = lr_b * lr_b_scale per group of g
    consecutive entries of the flattened B (g = lr_b numel / lr_b_scale numel).
"fp16" entries load as their half values in float32, "raw" in the original dtype. The same
`dequantize_entry` serves the in-memory path and the loader, so both give identical tensors.
Identical weights give identical bytes (sorted names, sorted JSON keys, deterministic compressors).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

from pgolf.errors import ArtifactError
from pgolf.quantize import groups as G
from pgolf.quantize.awq import column_mask
from pgolf.quantize.rows import qmax_for

# new roles go at the end: the payload order of existing artifacts stays byte-identical
ROLE_ORDER = ("q", "scale", "data", "lr_a", "lr_b", "lr_a_scale", "lr_b_scale", "hi_start", "hi_q", "hi_scale",
              "perm")
LAYOUTS = ("int8", "packed")
GROUPED = "grouped"  # not in LAYOUTS: `auto` keeps meaning int8 + packed; choose(..., groups=True) adds it
SIGNED_PACKED_ROLES = ("lr_a", "lr_b")  # LQER factors: INT2 / INT4 as "s<b>"
MIN_GROUP_BYTES = 4096  # grouped layout: smaller q roles ride in the "rest" segment


@dataclass
class Entry:
    """One state-dict tensor as stored: kind quant (q, scale[, lr_a, lr_b]), fp16 (data) or raw (data)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype of the original tensor, e.g. "float32"
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    bits: int = 0

    def payload_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


def hi_mask(parts: dict[str, torch.Tensor], cols: int) -> torch.Tensor:
    """Boolean column mask of an entry's AWQ-lite groups."""
    starts = parts["hi_start"].to(torch.int64).flatten().tolist()
    g = parts["hi_q"].shape[1] // max(len(starts), 1)
    if any(st < 0 or st + g > cols for st in starts) or g * len(starts) != parts["hi_q"].shape[1]:
        raise ArtifactError(f"AWQ groups {starts} (+{g}) do not fit {cols} columns; the file is corrupted")
    mask = column_mask(cols, starts, g)
    if int(mask.sum()) != parts["hi_q"].shape[1]:
        raise ArtifactError(f"AWQ groups {starts} overlap; the file is corrupted")
    return mask


def lowrank_delta(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """A @ B of a stored low-rank correction (fp16 factors, or LQER's asymmetric INT2/INT4 packing)."""
    a, b = parts["lr_a"].float(), parts["lr_b"].float()
    if "lr_a_scale" in parts:
        a = a * parts["lr_a_scale"].float()
        sb = parts["lr_b_scale"].float().flatten()
        b = (b.reshape(sb.numel(), -1) * sb.unsqueeze(1)).reshape(parts["lr_b"].shape)
    return a @ b


def dequantize_entry(e: Entry) -> torch.Tensor:
    """The tensor an entry stands for (float32 for float originals, the original dtype otherwise)."""
    if e.kind == "quant":
        w = e.parts["q"].float() * e.parts["scale"].float().unsqueeze(1)
        if "hi_q" in e.parts:
            rows = e.shape[0]
            cols = int(np.prod(e.shape[1:]))
            mask = hi_mask(e.parts, cols)
            full = torch.empty(rows, cols, dtype=torch.float32)
            full[:, ~mask] = w
            full[:, mask] = e.parts["hi_q"].float() * e.parts["hi_scale"].float().unsqueeze(1)
            w = full
        if "lr_a" in e.parts:
            w = w + lowrank_delta(e.parts)
        return w.reshape(e.shape)
    if e.kind == "fp16":
        return e.parts["data"].float().reshape(e.shape)
    if e.kind == "raw":
        return e.parts["data"].reshape(e.shape)
    raise ArtifactError(f"unknown tensor kind {e.kind!r} for {e.name}; the artifact is from a newer pgolf")


# ---------------------------------------------------------------------------------------------
# body encoding


def _pack_fields(u: np.ndarray, bits: int) -> bytes:
    """uint8 values < 2^bits as `bits`-bit fields, MSB first, zero-padded to a byte."""
    fields = np.unpackbits(u.astype(np.uint8)[:, None], axis=1)[:, 8 - bits :]
    return np.packbits(fields.reshape(-1)).tobytes()


def _unpack_fields(buf: bytes, bits: int, numel: int) -> np.ndarray:
    stream = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))[: numel * bits]
    if stream.size != numel * bits:
        raise ArtifactError(f"packed part holds fewer than {numel} {bits}-bit values; the file is corrupted")
    full = np.zeros((numel, 8), dtype=np.uint8)
    full[:, 8 - bits :] = stream.reshape(numel, bits)
    return np.packbits(full, axis=1).reshape(numel).astype(np.int16)


def pack_bits(q: torch.Tensor, bits: int) -> bytes:
    """q in [-qmax, qmax] -> (q + qmax) as `bits`-bit fields, MSB first, zero-padded to a byte."""
    return _pack_fields((q.flatten().to(torch.int16) + qmax_for(bits)).numpy(), bits)


def unpack_bits(buf: bytes, bits: int, numel: int) -> torch.Tensor:
    return torch.from_numpy(_unpack_fields(buf, bits, numel) - qmax_for(bits)).to(torch.int8)


def signed_width(t: torch.Tensor) -> int:
    """The fewest bits (>= 2) whose signed range [-2^(b-1), 2^(b-1) - 1] holds every value of t."""
    lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
    b = 2
    while b < 8 and not (-(1 << (b - 1)) <= lo and hi <= (1 << (b - 1)) - 1):
        b += 1
    return b


def pack_signed(t: torch.Tensor, bits: int) -> bytes:
    return _pack_fields((t.flatten().to(torch.int16) + (1 << (bits - 1))).numpy(), bits)


def unpack_signed(buf: bytes, bits: int, numel: int) -> torch.Tensor:
    return torch.from_numpy(_unpack_fields(buf, bits, numel) - (1 << (bits - 1))).to(torch.int8)


def _encode_part(role: str, t: torch.Tensor, bits: int, layout: str) -> tuple[str, bytes]:
    t = t.detach().cpu().contiguous()
    if role == "q":
        if layout == "packed" and bits < 8:
            return f"u{bits}", pack_bits(t, bits)
        if layout == GROUPED and t.ndim == 2:
            return "i8t", t.T.contiguous().to(torch.int8).numpy().tobytes()
        return "i8", t.to(torch.int8).numpy().tobytes()
    if role in SIGNED_PACKED_ROLES and t.dtype == torch.int8:
        b = signed_width(t)
        return (f"s{b}", pack_signed(t, b)) if b < 8 else ("i8", t.numpy().tobytes())
    if role == "hi_q":
        return "i8", t.to(torch.int8).numpy().tobytes()
    if t.dtype == torch.float16:
        return "f16", t.numpy().tobytes()
    arr = t.numpy()
    return f"np:{arr.dtype.str}", arr.tobytes()


def _decode_part(enc: str, buf: bytes, shape: list[int]) -> torch.Tensor:
    numel = int(np.prod(shape)) if shape else 1
    if enc == "i8":
        arr = np.frombuffer(buf, dtype=np.int8)
    elif enc == "i8t" and len(shape) == 2:
        arr = np.frombuffer(buf, dtype=np.int8)
        if arr.size == numel:
            arr = arr.reshape(shape[1], shape[0]).T
    elif enc.startswith("u"):
        return unpack_bits(buf, int(enc[1:]), numel).reshape(shape)
    elif enc.startswith("s") and enc[1:].isdigit():
        return unpack_signed(buf, int(enc[1:]), numel).reshape(shape)
    elif enc == "f16":
        arr = np.frombuffer(buf, dtype=np.float16)
    elif enc.startswith("np:"):
        arr = np.frombuffer(buf, dtype=np.dtype(enc[3:]))
    else:
        raise ArtifactError(f"unknown part encoding {enc!r}; the artifact is from a newer pgolf")
    if arr.size != numel:
        raise ArtifactError(f"artifact part holds {arr.size} values, its table says {numel}; the file is corrupted")
    return torch.from_numpy(arr.copy()).reshape(shape)


def encode_body(entries: list[Entry], layout: str = "int8", meta: dict | None = None) -> bytes:
    return b"".join(seg for _, seg in encode_segments(entries, layout, meta))


def _grouped_parts(e: Entry, sort_roles: tuple[str, ...], device) -> dict[str, torch.Tensor]:
    """The parts as the grouped layout stores them: q rows in similarity order, plus that order."""
    parts = dict(e.parts)
    q = parts.get("q")
    if q is not None and q.ndim == 2 and q.shape[0] > 2 and G.role_matches(e.name, sort_roles):
        order = G.similarity_order(q.to(device))
        parts["q"] = G.apply_order(q, order)
        parts["perm"] = torch.from_numpy(order)
    return parts


def encode_segments(entries: list[Entry], layout: str = "int8", meta: dict | None = None,
                    sort_roles: tuple[str, ...] = (), sort_device: str | torch.device = "cpu") -> list[tuple[str, bytes]]:
    """The body as consecutive (label, bytes) segments: one for int8/packed; for `grouped`, the header
    with every part but q ("rest"), then one segment per q role across layers (labelled by the role)."""
    entries = sorted(entries, key=lambda e: e.name)
    stored = [_grouped_parts(e, sort_roles, sort_device) if layout == GROUPED else e.parts for e in entries]
    encoded: dict[tuple[int, str], tuple[str, bytes]] = {}
    for i, (e, parts) in enumerate(zip(entries, stored)):
        for role, t in parts.items():
            if role not in ROLE_ORDER:
                raise ValueError(f"unknown part role {role!r}")
            encoded[(i, role)] = _encode_part(role, t, e.bits, layout)
    if layout == GROUPED:
        by_role: dict[str, list[tuple[int, int]]] = {}
        for i, e in enumerate(entries):
            if (i, "q") in encoded:
                role, layer = G.role_and_layer(e.name)
                by_role.setdefault(role, []).append((layer, i))
        # a role too small to be worth a stream of its own (e.g. the int8 gates) stays in the rest
        small = {r for r, items in by_role.items() if sum(len(encoded[(i, "q")][1]) for _, i in items) < MIN_GROUP_BYTES}
        runs = [[(i, role) for role in ROLE_ORDER if role != "q" for i in range(len(entries)) if (i, role) in encoded]
                + [(i, "q") for r in sorted(small) for _, i in sorted(by_role[r])]]
        big = sorted(set(by_role) - small)
        runs += [[(i, "q") for _, i in sorted(by_role[role])] for role in big]
        labels = ["rest", *big]
    else:
        runs = [[(i, role) for role in ROLE_ORDER for i in range(len(entries)) if (i, role) in encoded]]
        labels = ["body"]
    offsets: dict[tuple[int, str], tuple[int, int]] = {}
    segments: list[list[bytes]] = []
    pos = 0
    for run in runs:
        segments.append([])
        for key in run:
            buf = encoded[key][1]
            offsets[key] = (pos, len(buf))
            segments[-1].append(buf)
            pos += len(buf)
    table = []
    for i, (e, parts) in enumerate(zip(entries, stored)):
        listed = []
        for role in ROLE_ORDER:
            if role in parts:
                off, n = offsets[(i, role)]
                listed.append({"role": role, "enc": encoded[(i, role)][0], "shape": list(parts[role].shape),
                               "offset": off, "nbytes": n})
        item = {"name": e.name, "kind": e.kind, "shape": list(e.shape), "dtype": e.dtype, "parts": listed}
        if e.kind == "quant":
            item["bits"] = e.bits
        table.append(item)
    head = {"layout": layout, "tensors": table, **({"meta": meta} if meta else {})}
    header = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    out = [b"".join(seg) for seg in segments]
    out[0] = struct.pack("<I", len(header)) + header + out[0]
    return list(zip(labels, out))


def decode_body(body: bytes) -> tuple[list[Entry], dict]:
    """(entries, meta) from a body; meta is {} when the writer stored none."""
    try:
        (n,) = struct.unpack_from("<I", body, 0)
        header = json.loads(body[4 : 4 + n].decode("utf-8"))
        payload = memoryview(body)[4 + n :]
        out = []
        for item in header["tensors"]:
            parts = {}
            for p in item["parts"]:
                off, nb = int(p["offset"]), int(p["nbytes"])
                if off < 0 or off + nb > len(payload):
                    raise ArtifactError(f"artifact part of {item['name']} lies outside the payload; the file is corrupted")
                parts[p["role"]] = _decode_part(p["enc"], bytes(payload[off : off + nb]), p["shape"])
            if "perm" in parts:  # grouped layout: q was stored in similarity order
                order = parts.pop("perm").numpy()
                try:
                    parts["q"] = G.undo_order(parts["q"], order)
                except (KeyError, ValueError, IndexError):
                    raise ArtifactError(f"row order of {item['name']} is not a permutation; the file is corrupted") from None
            out.append(Entry(name=item["name"], kind=item["kind"], shape=tuple(item["shape"]),
                             dtype=item["dtype"], parts=parts, bits=int(item.get("bits", 0))))
        meta = header.get("meta") or {}
        if not isinstance(meta, dict):
            raise ArtifactError("artifact meta is not a JSON object; the file is corrupted")
        return out, meta
    except ArtifactError:
        raise
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
        raise ArtifactError(f"artifact tensor table is unreadable ({type(exc).__name__}); the file is corrupted") from None
