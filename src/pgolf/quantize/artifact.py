"""The artifact container (`artifact.pgz`): our own documented format, one compressed body.

File layout (all integers little-endian):

    offset  size  field
    0       4     magic b"PGQZ"
    4       2     format version (u16) = 2
    6       1     compressor id (u8): 1 zlib-9, 2 lzma (raw LZMA2, preset 9|extreme), 3 zstd-22,
                  4 brotli-11 (window 24)
    7       1     reserved, 0
    8       8     body length before compression (u64)
    16      8     compressed length (u64) = file size - 56
    24      32    sha256 of bytes 0..23 followed by the compressed body
    56      ...   compressed body

Body (before compression):

    0       4     header length N (u32)
    4       N     header: UTF-8 JSON, sorted keys, no spaces:
                  {"layout": "int8"|"packed", "meta": {...}, "tensors": [entry, ...]} with entries in
                  name order; meta (pgolf.quantize.meta) is what rebuilds and checks the model: its
                  config, how its run evaluated it, and the tokenizer's sha256 (format 2; new in 2),
                  entry = {"name", "kind": quant|fp16|raw, "shape", "dtype" (torch dtype of the
                  original tensor), "bits" (quant only), "parts": [part, ...]},
                  part  = {"role", "enc", "shape", "offset", "nbytes"} (offset from the payload start)
    4+N     ...   payload: every part's bytes, grouped by role in the order q, scale, data, lr_a,
                  lr_b, so that like bytes sit together for the entropy coder.

Part encodings: "i8" int8 values; "u<b>" the integers q + qmax (in [0, 2^b - 2]) bit-packed
MSB-first into ceil(numel*b/8) bytes; "f16" IEEE half; "np:<numpy dtype>" raw bytes (non-float
tensors). A "quant" entry dequantizes to q * scale[:, None] (+ lr_a @ lr_b when a low-rank
correction is stored), computed in float32; "fp16" to the half values as float32; "raw" to its
original dtype. The same `dequantize_entry` serves the in-memory path and the loader, so both give
identical tensors. Identical weights give identical bytes (sorted names, sorted JSON keys,
deterministic compressors).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pgolf.errors import ArtifactError
from pgolf.quantize.rows import qmax_for

MAGIC = b"PGQZ"
VERSION = 2  # 2: the body header carries "meta" (the artifact describes its model)
PREFIX = struct.Struct("<4sHBBQQ")  # magic, version, compressor id, reserved, body len, comp len
HEADER_BYTES = PREFIX.size + 32
COMPRESSORS = {"zlib": 1, "lzma": 2, "zstd": 3, "brotli": 4}
COMPRESSOR_NAMES = {v: k for k, v in COMPRESSORS.items()}
ROLE_ORDER = ("q", "scale", "data", "lr_a", "lr_b")
LAYOUTS = ("int8", "packed")
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


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


def dequantize_entry(e: Entry) -> torch.Tensor:
    """The tensor an entry stands for (float32 for float originals, the original dtype otherwise)."""
    if e.kind == "quant":
        w = e.parts["q"].float() * e.parts["scale"].float().unsqueeze(1)
        if "lr_a" in e.parts:
            w = w + e.parts["lr_a"].float() @ e.parts["lr_b"].float()
        return w.reshape(e.shape)
    if e.kind == "fp16":
        return e.parts["data"].float().reshape(e.shape)
    if e.kind == "raw":
        return e.parts["data"].reshape(e.shape)
    raise ArtifactError(f"unknown tensor kind {e.kind!r} for {e.name}; the artifact is from a newer pgolf")


# ---------------------------------------------------------------------------------------------
# compressors


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise ArtifactError("compressor zstd needs the zstandard package; pip install zstandard") from None
    return zstandard


def _brotli():
    try:
        import brotli
    except ImportError:
        raise ArtifactError("compressor brotli needs the brotli package; pip install brotli") from None
    return brotli


def compress(name: str, data: bytes) -> bytes:
    if name == "zlib":
        return zlib.compress(data, 9)
    if name == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    if name == "zstd":
        return _zstd().ZstdCompressor(level=22, write_content_size=True).compress(data)
    if name == "brotli":
        return _brotli().compress(data, quality=11, lgwin=24)
    raise ArtifactError(f"unknown compressor {name!r}; choose one of {', '.join(COMPRESSORS)}")


def decompress(name: str, data: bytes, size: int) -> bytes:
    if name == "zlib":
        return zlib.decompress(data)
    if name == "lzma":
        return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    if name == "zstd":
        return _zstd().ZstdDecompressor().decompress(data, max_output_size=size)
    if name == "brotli":
        return _brotli().decompress(data)
    raise ArtifactError(f"unknown compressor {name!r}")


# ---------------------------------------------------------------------------------------------
# body encoding


def pack_bits(q: torch.Tensor, bits: int) -> bytes:
    """q in [-qmax, qmax] -> (q + qmax) as `bits`-bit fields, MSB first, zero-padded to a byte."""
    u = (q.flatten().to(torch.int16) + qmax_for(bits)).numpy().astype(np.uint8)
    fields = np.unpackbits(u[:, None], axis=1)[:, 8 - bits :]
    return np.packbits(fields.reshape(-1)).tobytes()


def unpack_bits(buf: bytes, bits: int, numel: int) -> torch.Tensor:
    stream = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))[: numel * bits].reshape(numel, bits)
    full = np.zeros((numel, 8), dtype=np.uint8)
    full[:, 8 - bits :] = stream
    u = np.packbits(full, axis=1).reshape(numel).astype(np.int16)
    return torch.from_numpy(u - qmax_for(bits)).to(torch.int8)


def _encode_part(role: str, t: torch.Tensor, bits: int, layout: str) -> tuple[str, bytes]:
    t = t.detach().cpu().contiguous()
    if role == "q":
        if layout == "packed" and bits < 8:
            return f"u{bits}", pack_bits(t, bits)
        return "i8", t.to(torch.int8).numpy().tobytes()
    if t.dtype == torch.float16:
        return "f16", t.numpy().tobytes()
    arr = t.numpy()
    return f"np:{arr.dtype.str}", arr.tobytes()


def _decode_part(enc: str, buf: bytes, shape: list[int]) -> torch.Tensor:
    numel = int(np.prod(shape)) if shape else 1
    if enc == "i8":
        arr = np.frombuffer(buf, dtype=np.int8)
    elif enc.startswith("u"):
        return unpack_bits(buf, int(enc[1:]), numel).reshape(shape)
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
    entries = sorted(entries, key=lambda e: e.name)
    encoded: dict[tuple[int, str], tuple[str, bytes]] = {}
    for i, e in enumerate(entries):
        for role, t in e.parts.items():
            if role not in ROLE_ORDER:
                raise ValueError(f"unknown part role {role!r}")
            encoded[(i, role)] = _encode_part(role, t, e.bits, layout)
    offsets: dict[tuple[int, str], tuple[int, int]] = {}
    chunks: list[bytes] = []
    pos = 0
    for role in ROLE_ORDER:
        for i in range(len(entries)):
            if (i, role) in encoded:
                buf = encoded[(i, role)][1]
                offsets[(i, role)] = (pos, len(buf))
                chunks.append(buf)
                pos += len(buf)
    table = []
    for i, e in enumerate(entries):
        parts = []
        for role in ROLE_ORDER:
            if role in e.parts:
                off, n = offsets[(i, role)]
                enc = encoded[(i, role)][0]
                parts.append({"role": role, "enc": enc, "shape": list(e.parts[role].shape),
                              "offset": off, "nbytes": n})
        item = {"name": e.name, "kind": e.kind, "shape": list(e.shape), "dtype": e.dtype, "parts": parts}
        if e.kind == "quant":
            item["bits"] = e.bits
        table.append(item)
    head = {"layout": layout, "tensors": table, **({"meta": meta} if meta else {})}
    header = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    return struct.pack("<I", len(header)) + header + b"".join(chunks)


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


# ---------------------------------------------------------------------------------------------
# the file


def frame(body: bytes, compressor: str, compressed: bytes | None = None) -> bytes:
    comp = compress(compressor, body) if compressed is None else compressed
    prefix = PREFIX.pack(MAGIC, VERSION, COMPRESSORS[compressor], 0, len(body), len(comp))
    return prefix + hashlib.sha256(prefix + comp).digest() + comp


def unframe(blob: bytes, where: str = "artifact") -> tuple[bytes, str]:
    """(body, compressor name) or a one-line ArtifactError."""
    if len(blob) < HEADER_BYTES:
        raise ArtifactError(f"{where} is {len(blob)} B, shorter than the {HEADER_BYTES}-byte header; it is truncated")
    magic, version, cid, _, body_len, comp_len = PREFIX.unpack_from(blob, 0)
    if magic != MAGIC:
        raise ArtifactError(f"{where} does not start with {MAGIC!r} (found {magic!r}); not a pgolf artifact")
    if version != VERSION:
        raise ArtifactError(f"{where} has format version {version}, this pgolf reads {VERSION}; use a matching pgolf")
    if cid not in COMPRESSOR_NAMES:
        raise ArtifactError(f"{where} names unknown compressor id {cid}; the file is corrupted")
    comp = blob[HEADER_BYTES:]
    if len(comp) != comp_len:
        raise ArtifactError(
            f"{where} holds {len(comp):,} compressed bytes, its header says {comp_len:,}; "
            "the file is truncated or padded, re-copy it"
        )
    if hashlib.sha256(blob[: PREFIX.size] + comp).digest() != blob[PREFIX.size : HEADER_BYTES]:
        raise ArtifactError(f"{where} fails its sha256 check; the file is corrupted, re-copy or re-quantize it")
    name = COMPRESSOR_NAMES[cid]
    try:
        body = decompress(name, comp, body_len)
    except ArtifactError:
        raise
    except Exception as exc:  # zlib.error, lzma.LZMAError, zstd.ZstdError, brotli.error
        raise ArtifactError(f"{where} does not decompress with {name} ({type(exc).__name__}); the file is corrupted") from None
    if len(body) != body_len:
        raise ArtifactError(f"{where} decompresses to {len(body):,} B, its header says {body_len:,}; the file is corrupted")
    return body, name


# Compressor selection. brotli holds the GIL, so threads ran the 4 compressors x 2 layouts one after
# another (brotli-11 alone ~0.3 MB/s); each candidate now runs in its own forked process. Bodies of
# PROBE_MIN_BYTES or more are first probed: every candidate compresses the same deterministic sample
# (PROBE_SLICES evenly spaced slices), and only those whose size, scaled to the whole body, is within
# PROBE_MARGIN of the best estimate are compressed in full. The choice stays a function of the bytes.
PROBE_MIN_BYTES = 8 << 20
PROBE_SLICES, PROBE_SLICE_BYTES = 8, 256 << 10
PROBE_MARGIN = 0.02
# relative single-core cost of each compressor on int6 values (s/MB on the busy 2-core bench CPU), for ordering
SECONDS_PER_MB = {"brotli": 4.8, "lzma": 2.8, "zstd": 1.9, "zlib": 0.13}


def _probe_sample(body: bytes) -> bytes:
    step = len(body) // PROBE_SLICES
    return b"".join(body[i * step : i * step + PROBE_SLICE_BYTES] for i in range(PROBE_SLICES))


def _compress_child(conn, name: str, data: bytes) -> None:
    """Forked worker: compress, send b"\0" + bytes (or b"\1" + the error), leave without cleanup."""
    try:
        conn.send_bytes(b"\0" + compress(name, data))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        conn.send_bytes(b"\1" + f"{type(exc).__name__}: {exc}".encode())
    finally:
        conn.close()
        os._exit(0)  # no atexit/finalizers: the parent may hold CUDA, NCCL or store threads


def compress_parallel(jobs: list[tuple[str, bytes]], workers: int) -> list[bytes]:
    """[compress(name, data) for name, data in jobs], at most `workers` at a time in forked processes.

    Fork (not spawn): the children inherit the bodies without a copy and import nothing; each runs one
    compressor's C code and exits with os._exit, which is safe in a multi-threaded parent."""
    if workers <= 1 or len(jobs) <= 1:
        return [compress(name, data) for name, data in jobs]
    import multiprocessing
    import warnings
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("fork")
    results: list[bytes | None] = [None] * len(jobs)
    # longest first, so that with fewer workers than jobs the slow ones do not start last
    pending = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][1]) * SECONDS_PER_MB.get(jobs[i][0], 1.0))
    running: dict = {}
    while pending or running:
        while pending and len(running) < workers:
            i = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_compress_child, args=(send, *jobs[i]), daemon=True)
            with warnings.catch_warnings():  # python >= 3.12 warns about fork in threaded parents (see above)
                warnings.simplefilter("ignore", DeprecationWarning)
                proc.start()
            send.close()
            running[recv] = (i, proc)
        for conn in wait(list(running)):
            i, proc = running.pop(conn)
            try:
                msg = conn.recv_bytes()
            except EOFError:
                msg = b"\1worker died"
            conn.close()
            proc.join()
            if msg[:1] != b"\0":
                for other, p in running.values():
                    p.kill()
                raise ArtifactError(f"compressing with {jobs[i][0]} failed ({msg[1:].decode(errors='replace')}); "
                                    f"set COMPRESSOR to another one")
            results[i] = msg[1:]
    return [r for r in results if r is not None]


def choose(entries: list[Entry], compressor: str = "auto", layout: str = "auto",
           meta: dict | None = None, workers: int | None = None) -> tuple[bytes, dict]:
    """The smallest framed artifact over the allowed compressors and q layouts, and every size tried.

    `workers`: compression processes (default: one per CPU, serial for bodies under 256 KiB). The info
    dict has the full sizes (`candidates`), the probe's verdict on the others (`skipped`: estimated
    size / best estimate) and the compression wall time (`compress_seconds`)."""
    import time

    t0 = time.perf_counter()
    names = list(COMPRESSORS) if compressor == "auto" else [compressor]
    layouts = list(LAYOUTS) if layout == "auto" else [layout]
    if not any(e.kind == "quant" and e.bits < 8 for e in entries):
        layouts = layouts[:1]  # packing changes nothing when no integer is narrower than 8 bits
    for n in names:  # fail before any work when a library is missing
        compress(n, b"")
    bodies = {lay: encode_body(entries, lay, meta) for lay in layouts}
    jobs = [(lay, n) for lay in layouts for n in names]
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = cores if max(len(b) for b in bodies.values()) >= 256 << 10 else 1
    skipped: dict[str, float] = {}
    if len(jobs) > 1 and max(len(b) for b in bodies.values()) >= PROBE_MIN_BYTES:
        samples = {lay: _probe_sample(body) for lay, body in bodies.items()}
        probes = compress_parallel([(n, samples[lay]) for lay, n in jobs], workers)
        est = [len(c) * len(bodies[lay]) / len(samples[lay]) for (lay, _), c in zip(jobs, probes)]
        best_est = min(est)
        skipped = {f"{lay}+{n}": round(e / best_est, 4) for (lay, n), e in zip(jobs, est)
                   if e > best_est * (1 + PROBE_MARGIN)}
        jobs = [(lay, n) for lay, n in jobs if f"{lay}+{n}" not in skipped]
    results = compress_parallel([(n, bodies[lay]) for lay, n in jobs], workers)
    sizes = {f"{lay}+{n}": len(c) + HEADER_BYTES for (lay, n), c in zip(jobs, results)}
    best = min(range(len(jobs)), key=lambda i: (len(results[i]), i))  # ties: first in the fixed order
    lay, n = jobs[best]
    blob = frame(bodies[lay], n, results[best])
    return blob, {"compressor": n, "layout": lay, "body_bytes": len(bodies[lay]), "candidates": sizes,
                  "skipped": skipped, "workers": workers, "compress_seconds": round(time.perf_counter() - t0, 3)}


@dataclass
class Artifact:
    entries: list[Entry]
    compressor: str
    meta: dict  # pgolf.quantize.meta: model config, eval settings, tokenizer fingerprint

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The dequantized state dict (float32 floats, the model's exact keys)."""
        return {e.name: dequantize_entry(e) for e in self.entries}


def read_artifact(path: str | os.PathLike[str]) -> Artifact:
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"artifact {p} not found; run `pgolf quantize` first")
    body, name = unframe(p.read_bytes(), where=str(p))
    entries, meta = decode_body(body)
    return Artifact(entries, name, meta)


def load_artifact(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """artifact.pgz -> the dequantized state dict (float32 floats, the model's exact keys)."""
    return read_artifact(path).state_dict()
